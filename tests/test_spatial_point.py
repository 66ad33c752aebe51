"""The spatial point prediction: the mean of K samples, Rao-Blackwellised over each code's distribution.

A spot's expression is ``decode_latent(sum of its codes' codebook entries)``.  ``point=rao_blackwell`` adds,
at each code, the *expected* entry under the distribution the code is drawn from (the engine's ``on_probs``)
instead of the drawn entry: known answers (one level: exact for any K; greedy decoding: the decoded codes),
unbiasedness against exact enumeration, and less Monte-Carlo spread than the drawn codes' mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from armodal.ar_model import ARModel
from armodal.generation import GenerationConfig, process
from armodal.modalities.spatial.conditioner import SpatialConditioner
from armodal.modalities.spatial.predict import POINT_ESTIMATES, _engine, predict_expression, sample_section
from armodal.modalities.spatial.tokenizer import RVQExpressionTokenizer
from armodal.modalities.spatial.window import sample_windows
from armodal.models import build_transformer

from tests.test_spatial_window import F, _section

GENES = [f"g{i}" for i in range(8)]


def _spot_model(n_levels, codebook_size=4, seed=0):
    """A per-spot model (untrained, varied logits): its tokenizer, and the H&E conditions of 3 spots."""
    _, expr, feats = _section()
    tok = RVQExpressionTokenizer.fit(expr, GENES, n_levels=n_levels, codebook_size=codebook_size)
    torch.manual_seed(seed)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, max_seq_len=32, d_model=32,
                            n_layer=2, n_head=2, init_std=0.5).eval()
    cond = SpatialConditioner(32, feat_dim=F, max_offset=8.0, feat_dropout=0.0).eval()
    model = ARModel(net, tok, cond)
    c = {"feats": feats[:21].reshape(3, 7, F), "pos": torch.randn(3, 7, 2)}
    return model, tok, c


@torch.no_grad()
def _dist(model, c, ids):
    """The processed distribution (grammar, default settings) of the next code after ``ids`` [B, t]."""
    prefix = model.conditioner(c)
    types = model.tokenizer.types(ids) if ids.shape[1] else None
    logits = model.net(ids if ids.shape[1] else None, prefix=prefix, types=types)[:, -1]
    return process(logits, GenerationConfig(), allowed=model.tokenizer.allowed_next(ids)).softmax(-1)


def test_one_level_is_exact_for_any_number_of_samples():
    model, tok, c = _spot_model(n_levels=1)
    _, clean, z = sample_section(model, c, 3, GenerationConfig(seed=0), noise=False, latent=True)
    want = _dist(model, c, torch.zeros(3, 0, dtype=torch.long)) @ torch.from_numpy(tok.slot_values()[0])  # [3, D]
    for k in range(3):  # every sample gives the exact expectation, whatever code it drew
        np.testing.assert_allclose(z[:, k], want.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(clean[:, 0], clean[:, 1]) or not np.allclose(clean[:, 1], clean[:, 2])  # the draws differ


def test_two_levels_unbiased_and_less_spread_than_the_drawn_codes():
    model, tok, c = _spot_model(n_levels=2)
    vals = torch.from_numpy(tok.slot_values())  # [2, V, D]
    c1 = {k: v[:1] for k, v in c.items()}
    p1 = _dist(model, c1, torch.zeros(1, 0, dtype=torch.long))[0]  # [V]
    exact = p1 @ vals[0]
    for i in torch.nonzero(p1 > 0).flatten():  # enumerate every first code
        p2 = _dist(model, c1, i.view(1, 1))[0]
        exact = exact + p1[i] * (p2 @ vals[1])
    k = 3000
    _, clean, z = sample_section(model, c1, k, GenerationConfig(seed=1), noise=False, latent=True,
                                 spots_per_batch=1)
    rb_sd = z[0].std(0)
    se = rb_sd / np.sqrt(k)
    np.testing.assert_array_less(np.abs(z[0].mean(0) - exact.numpy()), 5 * se + 1e-6)
    # the drawn codes' own latent: sum of the two drawn entries (decode_latent is affine before the clip)
    res = model.generate(cond=c1, config=GenerationConfig(seed=1, max_new_tokens=2), num_samples=k,
                         generator=torch.Generator().manual_seed(2))
    ids = res.ids[:, -2:]
    mc = (vals[0][ids[:, 0]] + vals[1][ids[:, 1]]).numpy()
    np.testing.assert_array_less(np.abs(mc.mean(0) - exact.numpy()), 5 * mc.std(0) / np.sqrt(k) + 1e-6)
    assert (rb_sd <= mc.std(0) + 1e-6).all() and rb_sd.sum() < 0.8 * mc.std(0).sum()


def test_window_greedy_latent_is_the_decoded_codes():
    """Greedy decoding: every code's distribution is one-hot, so the Rao-Blackwellised latent of each spot is
    its decoded codes' -- checks the token -> (spot, level) map and the owner-window gather."""
    pos, expr, feats = _section(n_side=7)
    tok = RVQExpressionTokenizer.fit(expr, GENES, n_levels=3, codebook_size=4, window_radius=3)
    torch.manual_seed(0)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, max_seq_len=128, d_model=32,
                            n_layer=2, n_head=2, init_std=0.5).eval()
    cond = SpatialConditioner(32, feat_dim=F, max_offset=8.0, feat_dropout=0.0).eval()
    gen = _engine(ARModel(net, tok, cond), GenerationConfig(strategy="greedy"), None)
    codes, info = sample_windows(net, cond, tok, feats, pos, 2, size=12, order="hilbert", generate_fn=gen,
                                 windows_per_batch=3, latent=True)
    flat = (codes.reshape(-1, 3) - 1).numpy()
    np.testing.assert_allclose(tok.decode_latent(info["latent"].reshape(-1, info["latent"].shape[-1]).numpy()),
                               tok.decode_codes(flat, noise=False), rtol=1e-4, atol=1e-4)
    assert len(set(map(tuple, flat.tolist()))) > 3  # varied codes, so a wrong map would show


@pytest.mark.parametrize("sequence", ["spot", "window"])
def test_predict_expression_reports_both_point_predictions(sequence):
    pos, expr, feats = _section(n_side=5)
    radius = 3 if sequence == "window" else None
    tok = RVQExpressionTokenizer.fit(expr, GENES, n_levels=2, codebook_size=4, window_radius=radius,
                                     n_slots=1 if radius else 7)
    torch.manual_seed(0)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, max_seq_len=128, d_model=32,
                            n_layer=2, n_head=2).eval()
    model = ARModel(net, tok, SpatialConditioner(32, feat_dim=F, max_offset=8.0, feat_dropout=0.0).eval())
    layout = {"sequence": sequence, "window_size": 9, "order": "raster", "neighbours": 6, "spot_key": "none"}
    xy = pos * 100.0
    outs = {}
    for point in POINT_ESTIMATES:
        noisy, mean, info = predict_expression(model, feats, xy, 4, layout, GenerationConfig(seed=0), point=point)
        np.testing.assert_array_equal(mean, info[f"point_{point}"])
        outs[point] = info
        assert mean.shape == (len(pos), 8) and noisy.shape == (len(pos), 4, 8) and (mean >= 0).all()
    # the same draws either way (one seed); the two estimates of them differ (unbiasedness: tests above)
    for name in POINT_ESTIMATES:
        np.testing.assert_array_equal(outs["samples"][f"point_{name}"], outs["rao_blackwell"][f"point_{name}"])
    assert np.isfinite(outs["samples"]["point_rao_blackwell"]).all()
    assert not np.allclose(outs["samples"]["point_samples"], outs["samples"]["point_rao_blackwell"])
    with pytest.raises(ValueError, match="point='mean'.*rao_blackwell"):
        predict_expression(model, feats, xy, 2, layout, GenerationConfig(seed=0), point="mean")
