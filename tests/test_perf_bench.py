"""Smoke tests of the benchmark scripts on the tiny preset.  transformers (the HF peer) is in the
test extra, so `make test` installs it: a missing install fails here instead of skipping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import transformers  # noqa: E402,F401  - a hard requirement of these tests, never a skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_bench_generate_tiny(tmp_path):
    import bench_generate

    out = tmp_path / "g.json"
    r = bench_generate.main(["--sizes", "tiny", "--new", "4", "--p3-new", "3", "--repeats", "1", "--threads", "1",
                             "--contenders", "ours,ours_io,p1,p3", "--peak-bw", "10", "--out", str(out)])
    assert out.exists()
    run = r["runs"][0]
    assert run["params"]["ours"] > 0 and abs(run["params"]["ratio_ours_over_hf"] - 1) < 0.02
    assert set(run["results"]) == {"ours", "ours_io", "p1", "p3"}
    for name, row in run["results"].items():
        assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0, name
    # the [in, out] layout and the no-cache loop decode the same greedy tokens as the cached engine
    assert run["greedy_outputs_agree"] == {"ours_vs_ours_io": True, "ours_vs_p3": True}
    assert 0 < run["results"]["ours"]["bandwidth_utilisation"]
    assert r["peak_bandwidth_source"] == "flag"


def test_bench_train_tiny_and_flops(tmp_path):
    import bench_train

    assert bench_train.flops_per_token(100, 2, 8, 16) == 6 * 100 + 12 * 2 * 8 * 16
    r = bench_train.main(["--size", "tiny", "--seq", "32", "--batch", "2", "--steps", "1", "--warmup", "1",
                          "--repeats", "1", "--threads", "1", "--contenders", "ours,hf", "--peak-tflops", "1"])
    assert set(r["results"]) == {"ours", "hf"} and not r["errors"]
    for row in r["results"].values():
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] and row["last_loss"] > 0
    assert r["params"]["ratio_ours_over_hf"] == pytest.approx(1, abs=0.02)
