"""The package layout: old saved files keep loading, the tokens evaluator, CLI modules stay leaves."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from armodal.modalities.base import TOKENIZER_FILE, load_tokenizer
from armodal.utils.config import ROOT_DIR


def _as_old_file(directory, target: str) -> None:
    """Rewrite a saved tokenizer.json the way it was written before the layout change."""
    path = directory / TOKENIZER_FILE
    payload = json.loads(path.read_text())
    payload["_target_"] = target
    path.write_text(json.dumps(payload))


def test_old_jsb_tokenizer_file_loads(tmp_path):
    from armodal.modalities.music import JSBTokenizer

    tok = JSBTokenizer(beat_types=True, hold_types=4)
    tok.save(tmp_path)
    _as_old_file(tmp_path, "armodal.modalities.music.jsb.JSBTokenizer")
    back = load_tokenizer(tmp_path)
    assert isinstance(back, JSBTokenizer) and back.state() == tok.state()


def test_old_spatial_tokenizer_file_loads(tmp_path):
    from armodal.modalities.spatial import RVQExpressionTokenizer

    x = np.random.default_rng(0).gamma(1.0, 1.0, size=(60, 6)).astype(np.float32)
    tok = RVQExpressionTokenizer.fit(x, [f"g{i}" for i in range(6)], n_levels=2, codebook_size=4)
    tok.save(tmp_path)
    _as_old_file(tmp_path, "armodal.modalities.spatial._tokenizer.RVQExpressionTokenizer")
    back = load_tokenizer(tmp_path)
    assert isinstance(back, RVQExpressionTokenizer)
    np.testing.assert_array_equal(back.decode(tok.encode(x)), tok.decode(tok.encode(x)))


# ----------------------------------------------------------------------------- tokens evaluator
def test_tokens_sequence_stats_known_answer():
    from armodal.modalities.tokens.evaluate import sequence_stats

    s = sequence_stats(samples=[[0, 1, 2], [2, 3]], reference=[[0, 1, 2, 3]], train=[[0, 1, 2]], n_symbols=4)
    # unigrams: samples (1, 1, 2, 1) / 5 vs reference (1, 1, 1, 1) / 4 -> TV = (3 * 0.05 + 0.15) / 2
    assert s["unigram_tv"] == pytest.approx(0.15)
    assert s["bigram_seen"] == pytest.approx(2 / 3)  # (0,1) (1,2) seen in training, (2,3) not
    assert s["distinct_2"] == pytest.approx(1.0)
    assert s["mean_length"] == pytest.approx(2.5) and s["reference_mean_length"] == pytest.approx(4.0)


def test_tokens_evaluator_on_a_model(tmp_path):
    from armodal.ar_model import ARModel
    from armodal.models import build_transformer
    from armodal.modalities.tokens import TokensDataModule, TokensEvaluator, write_toy_corpus
    from armodal.modalities.tokens.evaluate import sequence_stats

    write_toy_corpus(tmp_path / "toy", vocab_size=8, length=12, n_train=40, n_val=8)
    dm = TokensDataModule(str(tmp_path / "toy"), seq_len=16, batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    net = build_transformer(vocab_size=dm.tokenizer.vocab_size, d_model=16, n_layer=1, n_head=2, max_seq_len=32)
    model = ARModel(net, dm.tokenizer).eval()
    m = TokensEvaluator(num_samples=6, generation={"max_new_tokens": 14})(model, dm, tmp_path / "out")
    assert all(isinstance(v, float) for v in m.values()), m
    samples = json.loads((tmp_path / "out" / "tokens_samples.json").read_text())
    assert len(samples) == 6 and m["tokens/num_samples"] == 6.0
    again = sequence_stats(samples, dm.sequences("val"), dm.sequences("train"), dm.tokenizer.n_symbols)
    assert m["tokens/bigram_seen"] == pytest.approx(again["bigram_seen"])
    assert 0.0 <= m["tokens/unigram_tv"] <= 1.0 and 0.0 <= m["tokens/eos_rate"] <= 1.0


# ----------------------------------------------------------------------------- import arrows
def test_import_armodal_loads_no_cli_module():
    code = ("import sys, armodal; armodal.ARModel; armodal.load; "
            "bad = [m for m in ('armodal.train', 'armodal.generate', 'armodal.eval') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT_DIR, check=True)
    assert out.stdout.strip() == "", f"importing armodal imported CLI modules: {out.stdout}"
