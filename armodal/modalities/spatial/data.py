"""Sections -> neighbourhood sequences: H&E prefix, then expression tokens.

One training item is a *centre* spot and its ``neighbours`` nearest spots:

* ``cond["feats"]`` [N, F]: cached patch features (a random augmented view per spot
  when training, the plain view otherwise), neighbours far-to-near, centre last;
* ``cond["pos"]`` [N, 2]: offsets from the centre in spot spacings (a random
  dihedral transform when training, matching the patch flips/rotations);
* ``ids`` [N * tokens_per_spot]: expression tokens, centre first, then neighbours
  near-to-far.  The decoder sees the H&E alone and generates expression; at inference
  only the centre's tokens are needed.

Leave-one-section-out: ``test_section`` is held out from everything that is fitted
(gene panel by HVG, tokenizer, self-supervised backbone, the model).
"""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader, Dataset

from armodal.modalities.base import register_datamodule
from armodal.modalities.spatial.features import FeatureConfig, FeatureExtractor
from armodal.modalities.spatial.io import (
    SpatialDataError,
    apply_panel,
    load_panel,
    normalize_log1p,
    read_section,
    select_hvg_panel,
)
from armodal.modalities.spatial.patches import extract_patches, patch_plan
from armodal.modalities.spatial.tokenizer import BinnedExpressionTokenizer, ExpressionTokenizer, RVQExpressionTokenizer

__all__ = ["SpatialDataModule", "neighbourhoods"]

log = logging.getLogger(__name__)

_D8 = torch.tensor(  # the 8 symmetries of the square as 2x2 matrices
    [[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
     [[-1, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [0, -1]], [[0, -1], [-1, 0]]], dtype=torch.float32)


def neighbourhoods(xy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For every spot: itself and its ``k`` nearest spots -> (index [n, k+1] centre first, near-to-far;
    offsets [n, k+1, 2] in units of the median spot spacing)."""
    n = len(xy)
    kk = min(k + 1, n)
    _, idx = cKDTree(xy).query(xy, k=kk)
    idx = np.asarray(idx).reshape(n, kk)
    if kk < k + 1:  # tiny sections: repeat the farthest available spot
        idx = np.concatenate([idx, np.repeat(idx[:, -1:], k + 1 - kk, 1)], 1)
    d, _ = cKDTree(xy).query(xy, k=2)
    spacing = float(np.median(d[:, 1])) if n > 1 else 1.0
    return idx, (xy[idx] - xy[:, None]) / spacing


class _SpotDataset(Dataset):
    """(section, spot index) pairs; the batch is assembled, vectorised, by ``SpatialDataModule.batch``."""

    def __init__(self, spots: list[tuple[str, int]]) -> None:
        self.spots = spots

    def __len__(self) -> int:
        return len(self.spots)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.spots[i]


class _Collate:
    def __init__(self, dm: "SpatialDataModule", train: bool) -> None:
        self.dm, self.train = dm, train

    def __call__(self, spots: list[tuple[str, int]]) -> dict:
        return self.dm.batch(spots, train=self.train)


@register_datamodule("spatial")
class SpatialDataModule(pl.LightningDataModule):
    """Spatial sections in the her2st / Visium / h5ad layouts, read once, split leave-one-section-out."""

    def __init__(
        self,
        root: str,
        sections: list[str],
        test_section: str | None = None,
        layout: str = "her2st",
        panel: str | None = None,
        n_hvg: int = 785,
        on_missing_genes: str = "error",
        on_mismatch: str = "warn",
        tokenizer: dict | None = None,
        features: dict | None = None,
        neighbours: int = 6,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.root, self.layout = Path(root), layout
        self.section_names = [str(s) for s in sections]
        if test_section is not None and str(test_section) not in self.section_names:
            raise SpatialDataError(f"test_section {test_section!r} is not one of {self.section_names}")
        self.test_section = None if test_section is None else str(test_section)
        self.train_sections = [s for s in self.section_names if s != self.test_section]
        if not self.train_sections:
            raise SpatialDataError("no training section left")
        self.panel_path, self.n_hvg = panel, n_hvg
        self.on_missing_genes, self.on_mismatch = on_missing_genes, on_mismatch
        self.tok_cfg = {"kind": "rvq", "n_levels": 4, "codebook_size": 32, "pca_dim": 0, "n_bins": 8, **(tokenizer or {})}
        known = {f.name for f in fields(FeatureConfig)}
        unknown = set(features or {}) - known
        if unknown:
            raise ValueError(f"unknown feature option(s) {sorted(unknown)}; known: {sorted(known)}")
        self.feat_cfg = FeatureConfig(**(features or {}))
        self.neighbours = neighbours if self.tok_cfg["kind"] == "rvq" else 0
        self.val_fraction, self.batch_size, self.num_workers = val_fraction, batch_size, num_workers
        self.cache_dir, self.seed = cache_dir, seed
        self.tokenizer: ExpressionTokenizer | None = None
        self._ready = False

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        raw = {}
        for s in self.section_names:
            kw = {"on_mismatch": self.on_mismatch} if self.layout == "her2st" else {}
            raw[s] = read_section(self.layout, root=self.root, section=s, **kw)
        norm = {s: normalize_log1p(a) for s, a in raw.items()}
        if self.panel_path:
            genes = load_panel(self.panel_path)
        else:
            genes = select_hvg_panel([norm[s] for s in self.train_sections], self.n_hvg)
        self.adatas, self.genes = apply_panel(norm, genes, on_missing=self.on_missing_genes)
        self.expr = {s: np.asarray(a.X.todense() if hasattr(a.X, "todense") else a.X, np.float32) for s, a in self.adatas.items()}

        # patches and features (fold-specific self-supervised backbone); pixels are read only on a cache miss
        fc = self.feat_cfg
        for s in self.section_names:
            _, kept = patch_plan(self.adatas[s], size=fc.patch_size, unit=fc.patch_unit, outside=fc.outside)
            if not kept.all():  # outside='drop' removed spots: keep every table aligned
                self.adatas[s] = self.adatas[s][kept].copy()
                self.expr[s] = self.expr[s][kept]

        def patches(s: str):
            return lambda: extract_patches(self.adatas[s], size=fc.patch_size, unit=fc.patch_unit,
                                           out_px=fc.patch_px, outside=fc.outside)[0]

        self.extractor = FeatureExtractor(
            fc, self.cache_dir, train_sections=self.train_sections,
            train_patches=lambda: np.concatenate([patches(s)() for s in self.train_sections]))
        self.feats = {s: self.extractor.features(s, patches(s), list(self.adatas[s].obs_names)) for s in self.section_names}
        self.feat_dim = self.extractor.dim

        self.nbr = {s: neighbourhoods(np.asarray(a.obsm["spatial"]), self.neighbours) for s, a in self.adatas.items()}
        self.nbr_t = {s: (torch.as_tensor(i), torch.as_tensor(o, dtype=torch.float32)) for s, (i, o) in self.nbr.items()}

        # split training spots into train / val (val: monitoring only)
        rng = np.random.default_rng(self.seed)
        train_spots, val_spots = [], []
        for s in self.train_sections:
            n = len(self.expr[s])
            is_val = rng.random(n) < self.val_fraction
            train_spots += [(s, j) for j in range(n) if not is_val[j]]
            val_spots += [(s, j) for j in range(n) if is_val[j]]
        if not val_spots:
            val_spots = train_spots[:1]
        self.train_spots, self.val_spots = train_spots, val_spots
        x_fit = np.concatenate([self.expr[s][[j for (t, j) in train_spots if t == s]] for s in self.train_sections])
        g_fit = np.concatenate([[s] * sum(t == s for t, _ in train_spots) for s in self.train_sections])
        if self.tok_cfg["kind"] == "rvq":
            self.tokenizer = RVQExpressionTokenizer.fit(x_fit, self.genes, n_levels=self.tok_cfg["n_levels"],
                                                        codebook_size=self.tok_cfg["codebook_size"], seed=self.seed,
                                                        n_slots=self.neighbours + 1, groups=g_fit,
                                                        pca_dim=self.tok_cfg["pca_dim"])
        elif self.tok_cfg["kind"] == "binned":
            self.tokenizer = BinnedExpressionTokenizer.fit(x_fit, self.genes, n_bins=self.tok_cfg["n_bins"])
        else:
            raise ValueError(f"tokenizer.kind must be 'rvq' or 'binned', got {self.tok_cfg['kind']!r}")
        tps = self.tokenizer.tokens_per_spot
        self.codes = {s: self.tokenizer.encode(x).view(-1, tps) for s, x in self.expr.items()}  # [n, tps] ids
        self._ready = True
        log.info("spatial: %d genes, train %d / val %d spots, test %s, feats %s", len(self.genes), len(train_spots),
                 len(val_spots), self.test_section, self.extractor.info.get("key"))

    # ------------------------------------------------------------------ items
    @property
    def seq_len(self) -> int:
        """Prefix + token positions of one sequence."""
        return (self.neighbours + 1) * (1 + self.tokenizer.tokens_per_spot)

    def batch(self, spots: list[tuple[str, int]], train: bool = False, generator: torch.Generator | None = None) -> dict:
        """Sequences for centre spots [(section, index)] -> ids [B, N*tps], types, cond feats [B, N, F] / pos [B, N, 2].

        Prefix order: neighbours far-to-near, centre last; tokens: centre first, then near-to-far.
        Training draws one augmented feature view per spot and a random dihedral transform of the offsets.
        """
        ids, feats, pos = [], [], []
        for s, j in spots:
            idx, off = self.nbr_t[s]
            nb = idx[j]  # [N]
            if train:
                views = torch.randint(0, self.feats[s].shape[0], (len(nb),), generator=generator)
                feats.append(self.feats[s][views, nb])
                pos.append(off[j] @ _D8[int(torch.randint(0, 8, (1,), generator=generator))].T)
            else:
                feats.append(self.feats[s][0, nb])
                pos.append(off[j])
            ids.append(self.codes[s][nb].reshape(-1))
        ids_t = torch.stack(ids)  # [B, N * tps]
        return {"ids": ids_t, "types": self.tokenizer.types(ids_t),
                "cond": {"feats": torch.stack(feats).flip(1).float(), "pos": torch.stack(pos).flip(1)}}

    def section_cond(self, s: str) -> dict:
        """Conditioning for every spot of section ``s`` as the centre: feats [n, N, F], pos [n, N, 2]."""
        return self.batch([(s, j) for j in range(len(self.expr[s]))])["cond"]

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_SpotDataset(self.train_spots), batch_size=self.batch_size, shuffle=True,
                          drop_last=len(self.train_spots) > self.batch_size, collate_fn=_Collate(self, True),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_SpotDataset(self.val_spots), batch_size=self.batch_size, collate_fn=_Collate(self, False),
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        if self.test_section is None:
            raise SpatialDataError("no test_section configured")
        spots = [(self.test_section, j) for j in range(len(self.expr[self.test_section]))]
        return DataLoader(_SpotDataset(spots), batch_size=self.batch_size, collate_fn=_Collate(self, False),
                          num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        return {}
