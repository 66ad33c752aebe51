"""``modality.data.spot_key``: how a window sequence's spot marker finds its own spot's H&E in the prefix.

none (the old layout, bit for bit), cell (the prefix element gets an embedding of the marker's cell),
slot (the marker is typed by the spot's index in the window order, and its prefix element gets that key).
The keys reach the conditioner in training batches and in spot-by-spot sampling alike; bad settings are
refused with the option's name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from armodal.modalities.spatial.conditioner import SpatialConditioner
from armodal.modalities.spatial.data import SpatialDataModule
from armodal.modalities.spatial.geometry import cell_index
from armodal.modalities.spatial.tokenizer import RVQExpressionTokenizer
from armodal.modalities.spatial.window import sample_windows, window_keys, window_layout, window_tokens

from tests.test_spatial import write_her2st
from tests.test_spatial_window import F, _section


@pytest.fixture(scope="module")
def tok():
    _, expr, _ = _section()
    return RVQExpressionTokenizer.fit(expr, [f"g{i}" for i in range(8)], n_levels=2, codebook_size=4, window_radius=3)


def _window(tok, centre=14, size=9, order="hilbert"):
    pos, expr, feats = _section()
    w = np.argsort(np.linalg.norm(pos - pos[centre], axis=1), kind="stable")[:size]
    sp, off = window_layout(pos, w, order)
    codes = tok.encode(expr).view(len(expr), -1)[torch.as_tensor(sp)][None]
    return codes, off[None], feats[torch.as_tensor(sp)][None]


def test_keys_and_marker_types_per_option(tok):
    codes, off, _ = _window(tok)
    q1 = tok.n_levels + 1
    assert window_keys(off, tok, "none") is None
    ids0, types0 = window_tokens(codes, off, tok)  # the old call
    ids_n, types_n = window_tokens(codes, off, tok, "none")
    assert torch.equal(ids0, ids_n) and torch.equal(types0, types_n)
    cell = window_keys(off, tok, "cell")
    np.testing.assert_array_equal(cell.numpy(), cell_index(off, tok.window_radius))
    ids_c, types_c = window_tokens(codes, off, tok, "cell")
    assert torch.equal(ids_c, ids0) and torch.equal(types_c, types0)  # cell keys leave the token stream as it was
    assert torch.equal(types_c[:, ::q1], cell)  # ... whose markers are typed by the same cell ids
    slot = window_keys(off, tok, "slot")
    assert torch.equal(slot, torch.arange(9)[None])
    ids_s, types_s = window_tokens(codes, off, tok, "slot")
    assert torch.equal(ids_s, ids0)
    assert torch.equal(types_s[:, ::q1], slot)  # markers typed by their index in the order ...
    for lv in range(1, q1):  # ... the codes still by level
        assert torch.equal(types_s[:, lv::q1], types0[:, lv::q1])
    with pytest.raises(ValueError, match="spot_key"):
        window_keys(off, tok, "slots")
    big = np.zeros((1, tok.n_cells + 1, 2))
    with pytest.raises(ValueError, match="spot_key=slot.*window_radius"):
        window_keys(big, tok, "slot")


def test_conditioner_adds_one_learned_embedding_per_key():
    torch.manual_seed(0)
    c = SpatialConditioner(16, feat_dim=F, feat_dropout=0.0, n_keys=5).eval()
    feats, pos = torch.randn(2, 4, F), torch.randn(2, 4, 2)
    zero = torch.zeros(2, 4, dtype=torch.long)
    base = c({"feats": feats, "pos": pos, "key": zero})
    key = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1]])
    keyed = c({"feats": feats, "pos": pos, "key": key})
    torch.testing.assert_close(keyed - base, c.key_emb.weight[key] - c.key_emb.weight[zero])
    plain = SpatialConditioner(16, feat_dim=F, feat_dropout=0.0).eval()
    plain.load_state_dict({k: v for k, v in c.state_dict().items() if not k.startswith("key_emb")})
    torch.testing.assert_close(keyed, plain({"feats": feats, "pos": pos}) + c.key_emb.weight[key])
    with pytest.raises(ValueError, match="no spot keys.*n_keys=0"):  # a key table the data never feeds
        c({"feats": feats, "pos": pos})
    with pytest.raises(ValueError, match="n_keys"):
        c({"feats": feats, "pos": pos, "key": key + 1})  # 5 is out of range
    with pytest.raises(ValueError, match="n_keys"):
        SpatialConditioner(16, feat_dim=F)({"feats": feats, "pos": pos, "key": key})  # keys without a key table


def test_sampling_passes_the_keys_and_types_the_markers(tok):
    from armodal.ar_model import ARModel
    from armodal.generation import GenerationConfig
    from armodal.models import build_transformer
    from armodal.modalities.spatial.geometry import cover
    from armodal.modalities.spatial.predict import _engine

    pos, _, feats = _section(n_side=7)
    torch.manual_seed(0)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, max_seq_len=128, d_model=32, n_layer=2, n_head=2).eval()
    cond = SpatialConditioner(32, feat_dim=F, max_offset=8.0, feat_dropout=0.0, n_keys=tok.n_cells).eval()
    seen = []
    real_forward = cond.forward
    cond.forward = lambda c: (seen.append(c.get("key")), real_forward(c))[1]
    engine = _engine(ARModel(net, tok, cond), GenerationConfig(), torch.Generator().manual_seed(0))
    marker_types = []

    def gen(prefix, t, types_fn, k):
        seq = torch.zeros(prefix.shape[0] * k, t, dtype=torch.long)
        marker_types.append(types_fn(seq)[:, :: tok.n_levels + 1])
        return engine(prefix, t, types_fn, k)

    out, info = sample_windows(net, cond, tok, feats, pos, 3, size=12, order="raster", generate_fn=gen,
                               windows_per_batch=4, spot_key="slot")
    assert out.shape == (len(pos), 3, tok.n_levels) and info["n_windows"] == len(cover(pos, 12).windows)
    assert seen and all(torch.equal(k, torch.arange(12).expand(k.shape[0], 12)) for k in seen)
    assert all(torch.equal(m, torch.arange(12).expand(m.shape[0], 12)) for m in marker_types)


@pytest.fixture(scope="module")
def her2st(tmp_path_factory):
    root = tmp_path_factory.mktemp("her2st")
    for i, s in enumerate(["A", "B", "C"]):
        write_her2st(root, s, seed=i)
    return root, tmp_path_factory.mktemp("cache")


def _dm(root, cache, **kw) -> SpatialDataModule:
    dm = SpatialDataModule(root=str(root), sections=["A", "B", "C"], test_section="C", panel=None, n_hvg=20,
                           tokenizer={"n_levels": 2, "codebook_size": 8},
                           features={"weights": "random", "patch_size": 100, "patch_px": 32, "n_views": 2},
                           window_size=9, val_fraction=0.2, cache_dir=str(cache), **kw)
    dm.setup("fit")
    return dm


def test_training_batches_carry_the_keys_and_draw_the_same_random_numbers(her2st):
    root, cache = her2st
    plain, slot, cell = _dm(root, cache), _dm(root, cache, spot_key="slot"), _dm(root, cache, spot_key="cell")
    items = plain.train_spots[:4]
    q1 = plain.tokenizer.tokens_per_spot + 1
    b0 = plain.batch(items, train=True, generator=torch.Generator().manual_seed(1))
    bs = slot.batch(items, train=True, generator=torch.Generator().manual_seed(1))
    bc = cell.batch(items, train=True, generator=torch.Generator().manual_seed(1))
    assert "key" not in b0["cond"]
    for b in (bs, bc):  # same windows, symmetries, views and targets: only the keys (and slot's marker types) differ
        assert torch.equal(b["ids"], b0["ids"]) and torch.equal(b["loss_mask"], b0["loss_mask"])
        assert torch.equal(b["cond"]["feats"], b0["cond"]["feats"]) and torch.equal(b["cond"]["pos"], b0["cond"]["pos"])
    assert torch.equal(bs["cond"]["key"], torch.arange(9).expand(4, 9))
    assert torch.equal(bs["types"][:, ::q1], bs["cond"]["key"])
    assert torch.equal(bc["types"], b0["types"]) and torch.equal(bc["cond"]["key"], b0["types"][:, ::q1])
    v = slot.batch(slot.val_spots[:3], train=False, score="val")
    assert torch.equal(v["cond"]["key"], torch.arange(9).expand(3, 9))


def test_bad_spot_key_settings_are_refused(tmp_path):
    kw = {"root": str(tmp_path), "sections": ["A", "B"], "test_section": "B"}
    with pytest.raises(ValueError, match="spot_key must be one of"):
        SpatialDataModule(**kw, spot_key="slots")
    with pytest.raises(ValueError, match="spot_key='slot'.*sequence='spot'"):
        SpatialDataModule(**kw, sequence="spot", spot_key="slot")
