"""Neighbour corruption of window training sequences (``modality.data.neighbour_corruption``): only earlier
spots' expression codes change, never the H&E prefix, the markers or the types; a corrupted spot carries no
loss; the last spot is never corrupted; p=0 draws no extra random numbers (so it reproduces the batches of the
code before the option); the same seed gives the same batch; validation batches are never corrupted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from armodal.modalities.spatial.data import SpatialDataModule
from armodal.modalities.spatial.window import window_layout, window_tokens

from tests.test_spatial import write_her2st


def _dm(root, cache, p: float, **kw) -> SpatialDataModule:
    dm = SpatialDataModule(root=str(root), sections=["A", "B", "C"], test_section="C", panel=None, n_hvg=20,
                           tokenizer={"n_levels": 2, "codebook_size": 8},
                           features={"weights": "random", "patch_size": 100, "patch_px": 32, "n_views": 2},
                           window_size=9, val_fraction=0.2, cache_dir=str(cache), neighbour_corruption=p, **kw)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def dms(tmp_path_factory):
    root = tmp_path_factory.mktemp("her2st")
    for i, s in enumerate(["A", "B", "C"]):
        write_her2st(root, s, seed=i)
    cache = tmp_path_factory.mktemp("cache")
    return _dm(root, cache, 0.0), _dm(root, cache, 0.5)


def test_p0_draws_exactly_the_old_random_numbers_and_keeps_measured_codes(dms):
    dm, _ = dms
    items = dm.train_spots[:5]
    g = torch.Generator().manual_seed(3)
    b = dm.batch(items, train=True, generator=g)
    ref = torch.Generator().manual_seed(3)  # the draws of the code before the option: a symmetry, then the views
    for k, (s, j) in enumerate(items):
        d8 = int(torch.randint(0, 8, (1,), generator=ref))
        sp, off = window_layout(dm.pos[s], dm.windows[s][j], dm.order, d8)
        torch.randint(0, dm.feats[s].shape[0], (len(sp),), generator=ref)
        ids, _ = window_tokens(dm.codes[s][torch.as_tensor(sp)][None], off[None], dm.tokenizer)
        assert torch.equal(b["ids"][k], ids[0])
        tps = dm.tokenizer.tokens_per_spot + 1
        assert torch.equal(b["loss_mask"][k], torch.as_tensor(np.repeat(dm.is_train[s][sp], tps)) & (ids[0] != dm.tokenizer.marker_id))
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=ref))


def test_corruption_touches_only_earlier_spots_codes_and_drops_their_loss(dms):
    clean_dm, dm = dms
    tok = dm.tokenizer
    q = tok.tokens_per_spot
    n_corrupt = n_spots = 0
    for k, item in enumerate(dm.train_spots[:60]):
        a = clean_dm.batch([item], train=True, generator=torch.Generator().manual_seed(k))
        b = dm.batch([item], train=True, generator=torch.Generator().manual_seed(k))
        for key in ("feats", "pos"):  # the H&E prefix (same view / symmetry draws come first)
            assert torch.equal(a["cond"][key], b["cond"][key])
        assert torch.equal(a["types"], b["types"])
        ia, ib = a["ids"][0].view(-1, q + 1), b["ids"][0].view(-1, q + 1)
        ma, mb = a["loss_mask"][0].view(-1, q + 1), b["loss_mask"][0].view(-1, q + 1)
        assert torch.equal(ia[:, 0], ib[:, 0])  # markers
        bad = ~mb[:, 1:].any(1) & ma[:, 1:].any(1)  # scored spots that lost their loss: the corrupted ones
        changed = (ia != ib).any(1)
        assert not (changed & mb[:, 1:].any(1)).any(), "codes changed on a spot that still carries a loss"
        assert not bad[-1] and torch.equal(ia[-1], ib[-1]), "the last spot is no spot's context"
        assert not (mb & ~ma).any(), "corruption never adds a target"
        s = item[0]
        train_codes = {tuple(c.tolist()) for c in dm.codes[s][dm.is_train[s]]}
        for i in torch.nonzero(bad).flatten().tolist():  # a corrupted spot carries some training spot's codes
            assert tuple(ib[i, 1:].tolist()) in train_codes
        n_corrupt += int(bad.sum())
        n_spots += int(ma[:-1, 1:].any(1).sum())
    assert 0.35 < n_corrupt / n_spots < 0.65, (n_corrupt, n_spots)


def test_corruption_is_seeded_and_never_touches_validation_batches(dms):
    clean_dm, dm = dms
    items = dm.train_spots[:8]
    b1 = dm.batch(items, train=True, generator=torch.Generator().manual_seed(5))
    b2 = dm.batch(items, train=True, generator=torch.Generator().manual_seed(5))
    for key in ("ids", "loss_mask", "types"):
        assert torch.equal(b1[key], b2[key])
    v1 = dm.batch(dm.val_spots[:6], train=False, score="val")
    v0 = clean_dm.batch(dm.val_spots[:6], train=False, score="val")
    assert torch.equal(v1["ids"], v0["ids"]) and torch.equal(v1["loss_mask"], v0["loss_mask"])


def test_bad_corruption_settings_are_refused(tmp_path):
    kw = {"root": str(tmp_path), "sections": ["A", "B"], "test_section": "B"}
    with pytest.raises(ValueError, match="neighbour_corruption"):
        SpatialDataModule(**kw, neighbour_corruption=1.0)
    with pytest.raises(ValueError, match="neighbour_corruption.*sequence='spot'"):
        SpatialDataModule(**kw, sequence="spot", neighbour_corruption=0.3)


def test_encoder_on_the_test_image_needs_the_explicit_inner_option(tmp_path):
    from armodal.modalities.spatial.io import SpatialDataError

    kw = {"root": str(tmp_path), "sections": ["A", "B", "C"], "test_section": "C",
          "features": {"ssl_sections": ["A", "B", "C"]}}
    with pytest.raises(SpatialDataError, match="ssl_test_image"):
        SpatialDataModule(**kw)
    assert SpatialDataModule(**kw, ssl_test_image=True).ssl_sections == ["A", "B", "C"]
