"""Shared helpers for scripts/bench_generate.py and scripts/bench_train.py.

Model shapes come from conf/model/<size>.yaml (vocabulary 50257, GPT-2's); the peer is
HF ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` of the same depth,
width, heads and vocabulary, with random weights (nothing is downloaded).
``transformers`` is the benchmark-only extra ``pip install -e .[bench]``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50257
# Vendor peaks of the GPUs we may be lent: HBM bandwidth (GB/s) and dense tensor-core TFLOP/s
# (bf16; "fp32" is TF32, which float32 matmuls use under set_float32_matmul_precision("high")).
# Matched on torch.cuda.get_device_name(), most specific first; anything else is measured
# (gpu_peaks), as the CPU always is.
GPU_SPECS = [
    ("H200 NVL", {"bw_GBs": 4800.0, "bf16": 835.0, "fp32": 418.0}),
    ("H200", {"bw_GBs": 4800.0, "bf16": 989.0, "fp32": 494.0}),  # H200 SXM (HBM3e)
    ("H100 NVL", {"bw_GBs": 3900.0, "bf16": 835.0, "fp32": 418.0}),
    ("H100 PCIe", {"bw_GBs": 2000.0, "bf16": 756.0, "fp32": 378.0}),
    ("H100", {"bw_GBs": 3350.0, "bf16": 989.0, "fp32": 494.0}),  # H100 SXM (HBM3)
    ("A100-SXM4-80GB", {"bw_GBs": 2039.0, "bf16": 312.0, "fp32": 156.0}),
    ("A100", {"bw_GBs": 1555.0, "bf16": 312.0, "fp32": 156.0}),  # 40 GB / PCIe
    ("L40S", {"bw_GBs": 864.0, "bf16": 362.0, "fp32": 183.0}),
    ("L4", {"bw_GBs": 300.0, "bf16": 121.0, "fp32": 60.0}),
]


def gpu_spec(name: str) -> tuple[str, dict] | None:
    """(matched key, peaks) for a CUDA device name such as ``NVIDIA H200``; None when unknown."""
    for key, spec in GPU_SPECS:
        if key.lower() in name.lower():
            return key, spec
    return None


def gpu_peaks(device, dtype_name: str = "bf16") -> dict:
    """Peak bandwidth (GB/s) and TFLOP/s of ``device``: the vendor spec when the name is known, else measured."""
    name = torch.cuda.get_device_name(device)
    hit = gpu_spec(name)
    if hit is not None:
        key, spec = hit
        return {"gpu": name, "bw_GBs": spec["bw_GBs"], "tflops": spec[dtype_name], "source": f"{key} spec"}
    bw = measure_bandwidth(device, mib=2048)["peak_GBs"]
    mm = measure_matmul_tflops(device, torch.bfloat16 if dtype_name == "bf16" else torch.float32, n=8192)
    return {"gpu": name, "bw_GBs": bw, "tflops": mm, "source": "measured (unknown GPU)"}


def model_shape(size: str) -> dict:
    """n_layer / n_head / d_model / max_seq_len of conf/model/<size>.yaml."""
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{size}.yaml")
    return {k: int(cfg[k]) for k in ("n_layer", "n_head", "d_model", "max_seq_len")}


def build_ours(size: str, device, dtype=torch.float32, max_seq_len: int | None = None):
    from armodal.models import build_transformer

    shape = {**model_shape(size), **({"max_seq_len": max_seq_len} if max_seq_len else {})}
    net = build_transformer(vocab_size=VOCAB, dropout=0.0, **shape)
    return net.to(device=device, dtype=dtype)


def build_hf(size: str, device, dtype=torch.float32, attn: str = "sdpa", max_seq_len: int | None = None):
    from transformers import GPT2Config, GPT2LMHeadModel

    s = {**model_shape(size), **({"max_seq_len": max_seq_len} if max_seq_len else {})}
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=s["max_seq_len"], n_embd=s["d_model"], n_layer=s["n_layer"],
        n_head=s["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )
    cfg._attn_implementation = attn
    model = GPT2LMHeadModel(cfg)
    return model.to(device=device, dtype=dtype)


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


def param_report(ours, hf) -> dict:
    a, b = num_params(ours), num_params(hf)
    return {"ours": a, "hf_gpt2": b, "ratio_ours_over_hf": round(a / b, 4)}


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def environment(device) -> dict:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def measure_bandwidth(device, mib: int = 512, repeats: int = 5) -> dict:
    """Streaming bandwidth (GB/s) of a large-array copy (read + write) and sum (read), best of ``repeats``."""
    n = mib * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    best_copy = best_sum = 0.0
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best_copy = max(best_copy, 2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        a.sum().item()
        best_sum = max(best_sum, a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del a, b
    return {"copy_GBs": round(best_copy, 2), "sum_GBs": round(best_sum, 2), "array_MiB": mib,
            "peak_GBs": round(max(best_copy, best_sum), 2)}


def measure_matmul_tflops(device, dtype, n: int = 2048, repeats: int = 5) -> float:
    """Achieved dense matmul throughput (TFLOP/s), best of ``repeats``: the CPU's practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e12)
    return round(best, 4)


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or on the CPU the process RSS sampled every 2 ms.

    ``peak_mib`` is the peak minus the level at entry (what the block allocated on top).
    """

    def __init__(self, device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.peak_mib = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._rss())
        self.peak_mib = round((peak - self._base) / 2**20, 1)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fit_exponent(xs, ys) -> float | None:
    """Least-squares slope of log y against log x."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 3) if den else None


def emit(report: dict, out: str | None) -> None:
    """Print the JSON report and, with ``--out``, write it to that file."""
    text = json.dumps(report, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
