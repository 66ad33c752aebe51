"""Sections -> sequences of an H&E prefix, then expression tokens.

``sequence='window'`` (the default, spatial autoregression): one item is a window -- a
centre spot and its ``window_size - 1`` nearest spots -- in a fixed spatial ``order``
(raster or Hilbert); see :mod:`armodal.modalities.spatial.window` for the layout.  Training
draws a random augmented feature view per spot and a random symmetry of the square for
the window (which changes its order); every spot's codes are a target, except the spots
kept for validation (monitoring only), which stay in the windows as context.  Validation
windows are centred on validation spots and score only them; test windows cover the
held-out section and score every spot once (in its owner window).

``sequence='spot'`` (per-spot AR, kept for comparison): one item is a *centre* spot and
its ``neighbours`` nearest spots:

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
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader, Dataset

from armodal.modalities.base import MissingSplitError, register_datamodule
from armodal.modalities.spatial.features import FeatureConfig, FeatureExtractor
from armodal.modalities.spatial.geometry import ORDERS, cover, knn_windows, spot_spacing
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
from armodal.modalities.spatial.window import D8, SPOT_KEYS, window_cond, window_layout, window_tokens
from armodal.utils.cache import content_key
from armodal.utils.safety import check_choice
from armodal.training.resume import ResumableLoader

__all__ = ["SpatialDataModule", "neighbourhoods"]

log = logging.getLogger(__name__)

_D8 = torch.tensor(D8, dtype=torch.float32)


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


def section_content_key(root: str | Path, adata) -> str:
    """What a section's patches and features depend on: the data root, the H&E image file's size, mtime
    and SHA-256 (or the image held in the AnnData), the spot ids and their coordinates."""
    import hashlib

    lib = next(iter(adata.uns.get("spatial", {})), None)
    entry = adata.uns["spatial"][lib] if lib is not None else {}
    src = str((entry.get("metadata") or {}).get("source_image_path") or "")
    files = [src] if src and Path(src).is_file() else []
    h = hashlib.sha256()
    if not files:
        for k in sorted(entry.get("images") or {}):
            h.update(np.ascontiguousarray(entry["images"][k]).tobytes())
    h.update(np.ascontiguousarray(np.asarray(adata.obsm["spatial"], dtype=np.float64)).tobytes())
    return content_key(root, files, spots=list(map(str, adata.obs_names)), rest=h.hexdigest())


class _SpotDataset(Dataset):
    """(section, spot index) pairs -- or (section, window id) for cover windows; the batch is assembled by
    ``SpatialDataModule.batch``."""

    def __init__(self, spots: list[tuple]) -> None:
        self.spots = spots

    def __len__(self) -> int:
        return len(self.spots)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.spots[i]


class _Collate:
    def __init__(self, dm: "SpatialDataModule", train: bool, score: str = "train") -> None:
        self.dm, self.train, self.score = dm, train, score

    def __call__(self, spots: list[tuple]) -> dict:
        return self.dm.batch(spots, train=self.train, score=self.score)


@register_datamodule("spatial")
class SpatialDataModule(pl.LightningDataModule):
    """Spatial sections in the her2st / Visium / h5ad layouts, read once, split leave-one-section-out."""

    def __init__(
        self,
        root: str,
        sections: list[str],
        test_section: str | None = None,
        layout: Literal["her2st", "visium", "h5ad"] = "her2st",
        panel: str | None = None,
        n_hvg: int = 785,
        on_missing_genes: Literal["error", "warn"] = "error",
        on_mismatch: Literal["warn", "error"] = "warn",
        tokenizer: dict | None = None,
        features: dict | None = None,
        neighbours: int = 6,
        sequence: str = "window",
        inputs: str = "features",
        window_size: int = 16,
        order: str = "raster",
        window_radius: int = 4,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        neighbour_corruption: float = 0.0,
        spot_key: str = "none",
        ssl_test_image: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_choice("layout", layout, ("her2st", "visium", "h5ad"), owner)
        check_choice("on_missing_genes", on_missing_genes, ("error", "warn"), owner)
        check_choice("on_mismatch", on_mismatch, ("warn", "error"), owner)
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
        check_choice("tokenizer.kind", self.tok_cfg["kind"], ("rvq", "binned"), owner)
        known = {f.name for f in fields(FeatureConfig)}
        unknown = set(features or {}) - known
        if unknown:
            raise ValueError(f"unknown feature option(s) {sorted(unknown)}; known: {sorted(known)}")
        self.feat_cfg = FeatureConfig(**(features or {}))
        self.ssl_sections = self.feat_cfg.ssl_sections or self.train_sections
        bad = [x for x in self.ssl_sections if x not in self.section_names]
        if bad:
            raise SpatialDataError(f"features.ssl_sections {bad} are not among the sections {self.section_names}")
        if self.test_section in self.ssl_sections and not ssl_test_image:
            raise SpatialDataError(f"features.ssl_sections includes the held-out test_section {self.test_section!r}: "
                                   "its image would train the encoder (ssl_test_image=true allows it for inner "
                                   "selection runs, whose test section is a training section of the outer fold)")
        if self.test_section in self.ssl_sections:
            log.warning("spatial: the encoder is fitted on the test section %s's image (no counts): ssl_test_image=true, "
                        "for inner selection runs only", self.test_section)
        if inputs not in ("features", "pixels"):
            raise ValueError(f"modality.data.inputs must be 'features' (frozen encoder) or 'pixels' (end to end), got {inputs!r}")
        self.inputs = inputs
        if sequence not in ("window", "spot"):
            raise ValueError(f"modality.data.sequence must be 'window' or 'spot', got {sequence!r}")
        if order not in ORDERS:
            raise ValueError(f"modality.data.order must be one of {ORDERS}, got {order!r}")
        if sequence == "window" and self.tok_cfg["kind"] != "rvq":
            raise ValueError("window sequences need the rvq tokenizer (a few tokens per spot)")
        self.sequence, self.window_size, self.order = sequence, int(window_size), order
        self.window_radius = int(window_radius)
        if self.window_size < 1 or self.window_radius < 1:
            raise ValueError(f"window_size ({window_size}) and window_radius ({window_radius}) must be >= 1")
        self.neighbour_corruption = float(neighbour_corruption)
        if not 0.0 <= self.neighbour_corruption < 1.0:
            raise ValueError(f"modality.data.neighbour_corruption must be in [0, 1), got {neighbour_corruption!r}")
        if self.neighbour_corruption and sequence != "window":
            raise ValueError("modality.data.neighbour_corruption corrupts the earlier spots' codes of window sequences; "
                             f"sequence={sequence!r} has none (use 0)")
        if spot_key not in SPOT_KEYS:
            raise ValueError(f"modality.data.spot_key must be one of {SPOT_KEYS}, got {spot_key!r}")
        if spot_key != "none" and sequence != "window":
            raise ValueError(f"modality.data.spot_key={spot_key!r} keys the spots of window sequences; sequence={sequence!r} "
                             "puts the centre spot's H&E last in its prefix already: add modality.data.spot_key=none "
                             "modality.conditioner.n_keys=0")
        self.spot_key = spot_key
        self.neighbours = neighbours if self.tok_cfg["kind"] == "rvq" else 0
        self.val_fraction, self.batch_size, self.num_workers = val_fraction, batch_size, num_workers
        self.cache_dir, self.seed = cache_dir, seed
        self.tokenizer: ExpressionTokenizer | None = None
        self._patches: dict[str, np.ndarray] = {}
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

        patches, image = self.section_patches, self.section_image
        self.content = {s: section_content_key(self.root, self.adatas[s]) for s in self.section_names}
        self.extractor = FeatureExtractor(
            fc, self.cache_dir, train_sections=self.ssl_sections,
            train_patches=lambda: np.concatenate([patches(s) for s in self.ssl_sections]),
            reference_images=lambda: [image(s) for s in self.ssl_sections],
            sources=",".join(f"{s}:{self.content[s]}" for s in sorted(self.ssl_sections)))
        self.feats = {s: self.extractor.features(s, lambda s=s: patches(s), list(self.adatas[s].obs_names),
                                                 image=lambda s=s: image(s), content=self.content[s])
                      for s in self.section_names}
        self.feat_dim = self.extractor.dim
        self.enc_feats = self.feats  # encoder features (the ridge baseline's inputs)
        if self.inputs == "pixels":  # the conditioner learns from the (normalised) patches themselves
            self.feats = {s: self._pixel_views(s) for s in self.section_names}
        self.pos = {s: np.asarray(a.obsm["spatial"], np.float64) / spot_spacing(np.asarray(a.obsm["spatial"]))
                    for s, a in self.adatas.items()}  # spot positions in spacing units

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
            self.tokenizer = RVQExpressionTokenizer.fit(
                x_fit, self.genes, n_levels=self.tok_cfg["n_levels"], codebook_size=self.tok_cfg["codebook_size"],
                seed=self.seed, n_slots=self.neighbours + 1, groups=g_fit, pca_dim=self.tok_cfg["pca_dim"],
                window_radius=self.window_radius if self.sequence == "window" else None)
        elif self.tok_cfg["kind"] == "binned":
            self.tokenizer = BinnedExpressionTokenizer.fit(x_fit, self.genes, n_bins=self.tok_cfg["n_bins"])
        else:
            raise ValueError(f"tokenizer.kind must be 'rvq' or 'binned', got {self.tok_cfg['kind']!r}")
        self.tokenizer.encoder = self.extractor  # saved with the model: a new slide is featurised the same way
        tps = self.tokenizer.tokens_per_spot
        self.codes = {s: self.tokenizer.encode(x).view(-1, tps) for s, x in self.expr.items()}  # [n, tps] ids
        self.is_train = {s: np.zeros(len(self.expr[s]), bool) for s in self.section_names}
        for s, j in train_spots:
            self.is_train[s][j] = True
        self._train_index = {s: torch.as_tensor(np.nonzero(self.is_train[s])[0]) for s in self.train_sections}
        if self.sequence == "window":
            self.windows = {s: knn_windows(p, np.arange(len(p)), self.window_size) for s, p in self.pos.items()}
            self.covers = {s: cover(p, self.window_size) for s, p in self.pos.items()}
        self._ready = True
        log.info("spatial: %d genes, train %d / val %d spots, test %s, feats %s", len(self.genes), len(train_spots),
                 len(val_spots), self.test_section, self.extractor.info.get("key"))

    # ------------------------------------------------------------------ pixels (read on demand)
    def section_patches(self, s: str) -> np.ndarray:
        """uint8 patches [n, px, px, 3] of section ``s`` (full-resolution image; kept in memory once read)."""
        cache = self._patches
        if s not in cache:
            fc = self.feat_cfg

            def extract():
                return extract_patches(self.adatas[s], size=fc.patch_size, unit=fc.patch_unit, out_px=fc.patch_px,
                                       outside=fc.outside)[0]

            ext = getattr(self, "extractor", None)
            content = getattr(self, "content", {}).get(s, "")
            cache[s] = ext.patches(s, extract, list(self.adatas[s].obs_names), content) if ext is not None else extract()
        return cache[s]

    def _pixel_views(self, s: str) -> torch.Tensor:
        """uint8 [V, n, 3, px, px]: the section's stain-normalised patches, view 0 plain, views 1.. augmented
        (the encoder's view augmentation, fixed seed)."""
        from armodal.modalities.spatial.features import _to_float  # noqa: PLC0415 (private helper of a sibling)
        from armodal.modalities.spatial.patches import augment  # noqa: PLC0415

        fc = self.feat_cfg
        x = _to_float(self.extractor.prepare(self.section_patches(s), self.section_image(s)))
        g = torch.Generator().manual_seed(fc.seed + 2)
        views = [x] + [augment(x, g, hed_sigma=fc.view_hed_sigma, stain_sigma=fc.view_stain_sigma) for _ in range(fc.n_views - 1)]
        return (torch.stack(views) * 255).round().to(torch.uint8)

    def section_image(self, s: str) -> np.ndarray:
        """The downsampled slide image of section ``s`` (for the slide-level stain maps)."""
        return np.asarray(next(iter(self.adatas[s].uns["spatial"].values()))["images"]["hires"])

    # ------------------------------------------------------------------ items
    @property
    def seq_len(self) -> int:
        """Prefix + token positions of one sequence."""
        if self.sequence == "window":
            return self.window_size * (2 + self.tokenizer.tokens_per_spot)
        return (self.neighbours + 1) * (1 + self.tokenizer.tokens_per_spot)

    def batch(self, spots: list[tuple], train: bool = False, generator: torch.Generator | None = None,
              score: str = "train") -> dict:
        """One batch of sequences (see the module docstring); ``score``: which spots are targets in window
        sequences -- 'train' (training spots), 'val' (validation spots), 'owned' (items are (section, cover
        window id): the spots the window owns)."""
        if self.sequence == "window":
            return self._window_batch(spots, train, generator, score)
        return self._spot_batch(spots, train, generator)

    def _window_batch(self, items: list[tuple], train: bool, generator: torch.Generator | None, score: str) -> dict:
        ids, types, feats, offs, mask = [], [], [], [], []
        for s, j in items:
            if score == "owned":
                cov = self.covers[s]
                win, scored = cov.windows[j], lambda sp, cov=cov, j=j: cov.owner[sp] == j
            else:
                win = self.windows[s][j]
                flag = self.is_train[s] if score == "train" else ~self.is_train[s]
                scored = lambda sp, flag=flag: flag[sp]
            d8 = int(torch.randint(0, 8, (1,), generator=generator)) if train else 0
            sp, off = window_layout(self.pos[s], win, self.order, d8)
            if train:
                views = torch.randint(0, self.feats[s].shape[0], (len(sp),), generator=generator)
                feats.append(self.feats[s][views, torch.as_tensor(sp)])
            else:
                feats.append(self.feats[s][0, torch.as_tensor(sp)])
            offs.append(off)
            codes, clean = self.codes[s][torch.as_tensor(sp)], np.ones(len(sp), bool)
            if train and self.neighbour_corruption:
                codes, clean = self._corrupt(s, codes, generator)
            i, t = window_tokens(codes[None], off[None], self.tokenizer, self.spot_key)
            ids.append(i[0])
            types.append(t[0])
            m = torch.as_tensor(np.repeat(scored(sp) & clean, self.tokenizer.tokens_per_spot + 1))
            mask.append(m & (i[0] != self.tokenizer.marker_id))
        cond = window_cond(torch.stack(feats).float(), np.stack(offs), self.tokenizer, self.spot_key)
        return {"ids": torch.stack(ids), "types": torch.stack(types), "loss_mask": torch.stack(mask), "cond": cond}

    def _corrupt(self, s: str, codes: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, np.ndarray]:
        """Training windows with noisy neighbours: each spot but the last (which is no spot's context), with
        probability ``neighbour_corruption``, gets the codes of a random training spot of its section (the
        training marginal) instead of its own, and carries no loss (its targets would be the wrong codes).
        So the later spots learn to read the H&E and to trust earlier codes only as much as they deserve, as
        at sampling time, where the earlier codes are the model's own samples.  -> (codes [n, Q], clean [n])."""
        bad = torch.rand(len(codes), generator=generator) < self.neighbour_corruption
        bad[-1] = False
        if bad.any():
            pool = self._train_index[s]
            pick = pool[torch.randint(0, len(pool), (int(bad.sum()),), generator=generator)]
            codes = codes.clone()
            codes[bad] = self.codes[s][pick]
        return codes, ~bad.numpy()

    def _spot_batch(self, spots: list[tuple[str, int]], train: bool = False, generator: torch.Generator | None = None) -> dict:
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
        """Per-spot sequences: conditioning for every spot of section ``s`` as the centre: feats [n, N, F], pos [n, N, 2]."""
        return self._spot_batch([(s, j) for j in range(len(self.expr[s]))])["cond"]

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(_SpotDataset(self.train_spots), batch_size=self.batch_size, shuffle=True,
                               drop_last=len(self.train_spots) > self.batch_size, collate_fn=_Collate(self, True),
                               num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_SpotDataset(self.val_spots), batch_size=self.batch_size, collate_fn=_Collate(self, False, "val"),
                          num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        if self.test_section is None:
            raise MissingSplitError(f"{self.root}: no test split (modality.data.test_section is not set)")
        s = self.test_section
        if self.sequence == "window":
            items = [(s, w) for w in range(len(self.covers[s].windows))]
            return DataLoader(_SpotDataset(items), batch_size=self.batch_size, collate_fn=_Collate(self, False, "owned"),
                              num_workers=self.num_workers)
        spots = [(s, j) for j in range(len(self.expr[s]))]
        return DataLoader(_SpotDataset(spots), batch_size=self.batch_size, collate_fn=_Collate(self, False),
                          num_workers=self.num_workers)

    def state_dict(self) -> dict[str, Any]:
        return {}
