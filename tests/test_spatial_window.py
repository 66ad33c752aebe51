"""Window sequences (spatial autoregression across spots): layout, teacher-forced loss = sum of the
per-token losses under the chosen order, causality across spots, and spot-by-spot sampling where every
spot is predicted exactly once per sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from armodal.models import build_transformer
from armodal.modalities.spatial.conditioner import SpatialConditioner
from armodal.modalities.spatial.geometry import cover, spatial_order
from armodal.modalities.spatial.tokenizer import RVQExpressionTokenizer
from armodal.modalities.spatial.window import sample_windows, window_codes, window_layout, window_tokens
from armodal.training.lit_module import batch_nll

F = 12


def _section(n_side=6, seed=0):
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(n_side, dtype=float), np.arange(n_side, dtype=float))
    pos = np.stack([x.ravel(), y.ravel()], 1) + rng.normal(0, 0.05, (n_side * n_side, 2))
    expr = np.log1p(rng.poisson(np.exp(1 + 0.3 * rng.normal(size=(len(pos), 8))))).astype(np.float32)
    return pos, expr, torch.tensor(rng.normal(size=(len(pos), F)), dtype=torch.float32)


def _model(tok, seed=0):
    torch.manual_seed(seed)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, max_seq_len=128, d_model=32, n_layer=2, n_head=2)
    cond = SpatialConditioner(32, feat_dim=F, max_offset=8.0, feat_dropout=0.0)
    return net.eval(), cond.eval()


def _window_batch(pos, expr, feats, tok, centres, size, order):
    codes = tok.encode(expr).view(len(expr), -1)
    ids, types, fs, ps = [], [], [], []
    for c in centres:
        w = np.argsort(np.linalg.norm(pos - pos[c], axis=1), kind="stable")[:size]
        sp, off = window_layout(pos, w, order)
        i, t = window_tokens(codes[torch.as_tensor(sp)][None], off[None], tok)
        ids.append(i[0]), types.append(t[0]), fs.append(feats[torch.as_tensor(sp)]), ps.append(torch.tensor(off, dtype=torch.float32))
    ids = torch.stack(ids)
    return {"ids": ids, "types": torch.stack(types), "loss_mask": ids != tok.marker_id,
            "cond": {"feats": torch.stack(fs), "pos": torch.stack(ps)}}


@pytest.fixture(scope="module")
def tok():
    _, expr, _ = _section()
    return RVQExpressionTokenizer.fit(expr, [f"g{i}" for i in range(8)], n_levels=2, codebook_size=4, window_radius=3)


def test_window_layout_ids_types_and_grammar(tok):
    pos, expr, feats = _section()
    b = _window_batch(pos, expr, feats, tok, [14], 9, "raster")
    ids, types = b["ids"][0], b["types"][0]
    q = tok.n_levels
    assert ids.shape == (9 * (q + 1),) and tok.vocab_size == 1 + 2 * 4 + 1 and tok.num_types == 49 + q
    assert (ids[:: q + 1] == tok.marker_id).all()
    assert (types[1 :: q + 1] == tok.n_cells).all() and (types[2 :: q + 1] == tok.n_cells + 1).all()
    assert types[:: q + 1].max() < tok.n_cells and len(set(types[:: q + 1].tolist())) == 9  # one cell per spot
    for t in range(len(ids)):  # the grammar admits exactly the tokens of the layout
        assert tok.allowed_next(ids[None, :t])[0, ids[t]]
        assert tok.allowed_next(ids[None, :t])[0].sum() == (1 if t % (q + 1) == 0 else tok.codebook_size)
    np.testing.assert_array_equal(window_codes(ids[None], q)[0].reshape(-1), ids[ids != tok.marker_id])
    np.testing.assert_allclose(tok.decode(ids), tok.decode(ids[ids != tok.marker_id]))  # markers are dropped
    with pytest.raises(ValueError, match="window geometry"):
        tok.types(ids[None])


@pytest.mark.parametrize("order", ["raster", "hilbert"])
def test_teacher_forced_loss_is_the_sum_of_per_token_losses(tok, order):
    pos, expr, feats = _section()
    net, cond = _model(tok)
    b = _window_batch(pos, expr, feats, tok, [14, 3], 9, order)
    with torch.no_grad():
        total, n = batch_nll(net, cond, b, tok.pad_id)
        prefix = cond(b["cond"])
        p = prefix.shape[1]
        manual, count = 0.0, 0
        for t in range(b["ids"].shape[1]):  # token t from the prefix and tokens < t only (fresh forward each time)
            if not b["loss_mask"][0, t]:
                continue
            lg = net(b["ids"][:, :t], prefix=prefix, types=b["types"][:, :t]) if t else net(None, prefix=prefix)
            lp = torch.log_softmax(lg[:, -1].float(), -1)
            manual += -lp[torch.arange(2), b["ids"][:, t]].sum().item()
            count += 2
    assert int(n) == count == 2 * 9 * tok.n_levels  # markers carry no loss
    assert float(total) == pytest.approx(manual, rel=1e-4)
    assert p == 9


def test_changing_a_spot_never_changes_earlier_spots(tok):
    pos, expr, feats = _section()
    net, cond = _model(tok)
    b = _window_batch(pos, expr, feats, tok, [14], 9, "hilbert")
    q1 = tok.n_levels + 1
    with torch.no_grad():
        prefix = cond(b["cond"])
        base = net(b["ids"], prefix=prefix, types=b["types"])
        for j in (2, 5, 8):
            ids = b["ids"].clone()
            seg = slice(j * q1 + 1, (j + 1) * q1)  # spot j's codes (after its marker)
            level = torch.arange(tok.n_levels) * tok.codebook_size
            ids[0, seg] = 1 + level + (ids[0, seg] - 1 - level + 1) % tok.codebook_size  # another code at every level
            assert (ids[0, seg] != b["ids"][0, seg]).all()
            new = net(ids, prefix=prefix, types=b["types"])
            first_changed = prefix.shape[1] + j * q1 + 1  # the first changed token's position
            # logits at every position before it (the prefix, spots 1..j-1, spot j's marker) are unchanged ...
            torch.testing.assert_close(new[:, :first_changed], base[:, :first_changed], atol=0, rtol=0)
            # ... and later spots do see the change (the test is not vacuous)
            assert not torch.allclose(new[:, first_changed:], base[:, first_changed:])


def test_spot_by_spot_sampling_predicts_every_spot_once(tok):
    from armodal.ar_model import ARModel
    from armodal.generation import GenerationConfig
    from armodal.modalities.spatial.predict import _engine

    pos, expr, feats = _section(n_side=7)
    net, cond = _model(tok)
    g = torch.Generator().manual_seed(0)
    calls = []
    engine = _engine(ARModel(net, tok, cond), GenerationConfig(), g)

    def gen(prefix, t, types_fn, k):
        calls.append((prefix.shape, t, k))
        return engine(prefix, t, types_fn, k)

    out, info = sample_windows(net, cond, tok, feats, pos, 5, size=12, order="raster", generate_fn=gen, windows_per_batch=3)
    n = len(pos)
    assert out.shape == (n, 5, tok.n_levels) and info["n_windows"] == len(cover(pos, 12).windows) > 1
    for q in range(tok.n_levels):  # every sampled id is a code of its level
        assert ((out[..., q] - 1) // tok.codebook_size == q).all()
    assert all(t == 12 * (tok.n_levels + 1) and k == 5 for _, t, k in calls)
    # the same seed gives the same samples; the K samples of a spot differ
    g.manual_seed(0)
    again, _ = sample_windows(net, cond, tok, feats, pos, 5, size=12, order="raster", generate_fn=gen, windows_per_batch=3)
    torch.testing.assert_close(again, out)
    assert (out != out[:, :1]).any()


def test_window_order_follows_the_spatial_order():
    pos, _, _ = _section()
    w = np.arange(len(pos))
    sp, off = window_layout(pos, w, "raster")
    np.testing.assert_array_equal(sp, w[spatial_order(pos - pos[0], "raster")])
    np.testing.assert_allclose(off, pos[sp] - pos[0])
    sp8, off8 = window_layout(pos, w, "raster", d8=1)  # a rotated window is ordered in its rotated frame
    assert not np.array_equal(sp8, sp)
    np.testing.assert_allclose(np.linalg.norm(off8, axis=1), np.linalg.norm(pos[sp8] - pos[0], axis=1))


def test_teacher_forced_diagnostic_conditions_on_the_measured_codes(tok):
    """scripts/spatial_exposure.py: each spot is sampled once from its owner window after the *measured* codes
    of the spots before it -- the first spot of a window sees none, so changing the measured codes leaves it
    alone and changes later spots."""
    import importlib.util
    from pathlib import Path

    from armodal.ar_model import ARModel
    from armodal.generation import GenerationConfig

    spec = importlib.util.spec_from_file_location("spatial_exposure", Path(__file__).resolve().parents[1] / "scripts" / "spatial_exposure.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pos, expr, feats = _section(n_side=7)
    net, cond = _model(tok)
    with torch.no_grad():  # a sharper random net: its samples react to the context (at init they barely do)
        for w in net.parameters():
            w.mul_(4)
    model = ARModel(net, tok, cond)
    true = tok.encode(expr).view(len(expr), -1)
    run = lambda codes: mod.teacher_forced_codes(model, feats, pos, codes, 32, 12, "raster", GenerationConfig(seed=0))  # noqa: E731
    a = run(true)
    assert a.shape == (len(pos), 32, tok.n_levels)
    for q in range(tok.n_levels):
        assert ((a[..., q] - 1) // tok.codebook_size == q).all()
    torch.testing.assert_close(run(true), a)
    # another measured code for one spot j: only the spots after j in their owner window may change
    cov = cover(pos, 12)
    order = {w: list(window_layout(pos, cov.windows[w], "raster")[0]) for w in range(len(cov.windows))}
    j = 24
    after = np.array([j in order[cov.owner[s]] and order[cov.owner[s]].index(j) < order[cov.owner[s]].index(s)
                      for s in range(len(pos))])
    other = true.clone()
    other[j] = true[(true != true[j]).any(1)][0]
    b = run(other)
    assert after.sum() > 3 and torch.equal(a[~after], b[~after])
    assert not torch.equal(a[after], b[after])
