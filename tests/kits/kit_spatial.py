"""Contract kit for the spatial modality (synthetic her2st sections, random-weight patch features)."""

from __future__ import annotations

import numpy as np

from armodal.modalities.spatial import BinnedExpressionTokenizer, RVQExpressionTokenizer, SpatialDataModule
from tests.test_spatial import write_her2st

MODALITY = "spatial"
EXPERIMENTS = ("spatial_her2st",)
_GENES = [f"g{i}" for i in range(8)]
_FEATURES = {"weights": "random", "patch_size": 100, "patch_px": 32, "n_views": 1}


def _expr(seed: int = 0, n: int = 40) -> np.ndarray:
    return np.log1p(np.random.default_rng(seed).poisson(3.0, size=(n, len(_GENES)))).astype(np.float32)


def tokenizers(tmp):
    x = _expr()
    rvq = RVQExpressionTokenizer.fit(x, _GENES, n_levels=2, codebook_size=8)
    binned = BinnedExpressionTokenizer.fit(x, _GENES, n_bins=6)
    return {"spatial.rvq": (rvq, [x[:3]]), "spatial.binned": (binned, [binned.decode(binned.encode(x[:2]))])}


def representable(tok, item):
    """RVQ is lossy: its reconstruction is what it can represent (checked again after save/load)."""
    return tok.decode(tok.encode(item)) if isinstance(tok, RVQExpressionTokenizer) else item


def same(a, b):
    return np.allclose(a, b, atol=1e-5)


def _sections(tmp):
    root = tmp / "her2st"
    if not root.exists():
        for i, s in enumerate(["A", "B", "C"]):
            write_her2st(root, s, seed=i)
    return root


def datamodules(tmp):
    return {"spatial": SpatialDataModule(str(_sections(tmp)), ["A", "B", "C"], test_section="C", panel=None, n_hvg=8,
                                         tokenizer={"n_levels": 2, "codebook_size": 8}, features=_FEATURES,
                                         neighbours=2, batch_size=8, cache_dir=str(tmp / "cache"))}


def experiments(tmp):
    feats = [f"++modality.data.features.{k}={v}" for k, v in _FEATURES.items()]
    return {"spatial_her2st": [
        f"modality.data.root={_sections(tmp)}", "modality.data.sections=[A,B,C]", "modality.data.test_section=C",
        "modality.data.panel=null", "modality.data.n_hvg=8", "modality.data.neighbours=2",
        "modality.data.tokenizer.n_levels=2", "modality.data.tokenizer.codebook_size=8",
        "modality.data.tokenizer.pca_dim=0", *feats,
        "modality.data.batch_size=8", "model.d_model=32", "model.n_head=2", "requires=[]"]}
