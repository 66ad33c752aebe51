"""The benchmark scripts, run as scripts on the tiny preset.  transformers (the HF peer) is in the
test extra, so `make test` installs it: a missing install fails here instead of skipping.

Each script runs in a subprocess exactly as documented (``python scripts/<name>.py ...``), so
nothing here imports a script through ``sys.path``; ``bench_common`` (no sibling imports) is
loaded from its file for the GPU-spec lookup.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import transformers  # noqa: F401  - a hard requirement of these tests, never a skip

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str, out: Path, timeout: int = 600) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args, "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=out.parent)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}"
    return json.loads(out.read_text())


def load_bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "scripts" / "bench_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_generate_tiny(tmp_path):
    r = run_script("bench_generate", "--sizes", "tiny", "--new", "4", "--p3-new", "3", "--repeats", "1",
                   "--threads", "1", "--contenders", "ours,ours_io,ours_int8,ours_int8dyn,p1,p3", "--peak-bw", "10",
                   out=tmp_path / "g.json")
    run = r["runs"][0]
    assert not run["errors"]
    assert run["params"]["ours"] > 0 and abs(run["params"]["ratio_ours_over_hf"] - 1) < 0.02
    assert set(run["results"]) == {"ours", "ours_io", "ours_int8", "ours_int8dyn", "p1", "p3"}
    for name, row in run["results"].items():
        assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0, name
    # the [in, out] layout and the no-cache loop decode the same greedy tokens as the cached engine
    assert run["greedy_outputs_agree"] == {"ours_vs_ours_io": True, "ours_vs_p3": True}
    res = run["results"]
    assert 0 < res["ours"]["bandwidth_utilisation"]
    # int8 weights: a quarter of the fp32 linear bytes (the tied fp32 table is only looked up by row)
    assert res["ours_int8"]["bytes_per_step_MB"] < 0.3 * res["ours"]["bytes_per_step_MB"]
    assert r["peak_bandwidth_source"] == "flag" and r["sampling"] == "greedy"
    assert run["ratios"]["ours_int8_over_p1_tokens_per_s"] == pytest.approx(
        res["ours_int8"]["tokens_per_s"] / res["p1"]["tokens_per_s"], rel=0.01)


def test_bench_train_tiny_and_flops(tmp_path):
    r = run_script("bench_train", "--size", "tiny", "--seq", "32", "--batch", "2", "--steps", "1", "--warmup", "1",
                   "--repeats", "1", "--threads", "1", "--contenders", "ours,hf", "--peak-tflops", "1",
                   out=tmp_path / "t.json")
    assert set(r["results"]) == {"ours", "hf"} and not r["errors"]
    shape = r["shape"]
    for name, row in r["results"].items():
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["last_loss"] > 0
        n = r["params"]["ours" if name == "ours" else "hf_gpt2"]
        assert row["flops_per_token"] == 6 * n + 12 * shape["n_layer"] * shape["d_model"] * 32
    assert r["params"]["ratio_ours_over_hf"] == pytest.approx(1, abs=0.02)


def test_gpu_peaks_by_device_name():
    bc = load_bench_common()
    assert bc.gpu_spec("NVIDIA H200")[1]["bw_GBs"] == 4800.0
    assert bc.gpu_spec("NVIDIA H200 NVL")[0] == "H200 NVL"
    assert bc.gpu_spec("NVIDIA H100 80GB HBM3")[1]["bw_GBs"] == 3350.0
    assert bc.gpu_spec("NVIDIA H100 PCIe")[1]["bw_GBs"] == 2000.0
    assert bc.gpu_spec("NVIDIA A100-SXM4-80GB")[1]["bw_GBs"] == 2039.0
    assert bc.gpu_spec("Some Future GPU") is None  # measured instead


def test_bench_sequence_cost_tiny_writes_plot_and_exponents(tmp_path):
    out = tmp_path / "sc.json"
    r = run_script("bench_sequence_cost", "--size", "tiny", "--max-len", "64", "--positions", "8,16,32,60",
                   "--steps", "2", "--repeats", "1", "--tail-from", "16", "--threads", "1", out=out)
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r["positions"] == [8, 16, 32, 60] and set(r["curves"]) == {"no_cache", "eager_kv", "compiled_static", "hf"}
    for name, c in r["curves"].items():
        assert len(c["ms_per_token"]) == 4 and all(t > 0 for t in c["ms_per_token"]), name
        assert isinstance(c["exponent_all"], float) and isinstance(c["exponent_tail"], float), name


def test_fit_exponent_recovers_a_power_law():
    bc = load_bench_common()
    xs = [16, 64, 256, 1024]
    assert bc.fit_exponent(xs, [3 * x**1.5 for x in xs]) == 1.5
    assert bc.fit_exponent(xs, [7.0] * 4) == 0.0
    assert bc.fit_exponent([16], [1.0]) is None
