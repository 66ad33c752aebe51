"""Readers: one AnnData per tissue section, following scanpy's Visium conventions.

Every reader returns raw counts in ``X`` with

* ``obsm['spatial']`` [n_spots, 2]: spot centres (x, y) in *full-resolution* image pixels;
* ``uns['spatial'][library_id]``:
  - ``images['hires']``: a downsampled RGB uint8 image for plotting,
  - ``scalefactors``: ``tissue_hires_scalef`` (hires px / full-res px),
    ``spot_diameter_fullres`` and ``microns_per_pixel`` (full-res),
  - ``metadata['source_image_path']``: the full-resolution image (patches are cut from it
    when present, else from ``images['hires']``).

Bad input raises :class:`SpatialDataError` naming the file, or warns with a count.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterable, Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from PIL import Image

from armodal.utils.safety import check_choice

__all__ = [
    "SpatialDataError",
    "read_her2st",
    "read_visium",
    "read_h5ad_section",
    "read_section",
    "load_panel",
    "select_hvg_panel",
    "normalize_log1p",
    "apply_panel",
    "load_image",
]

log = logging.getLogger(__name__)

Image.MAX_IMAGE_PIXELS = None  # whole-slide H&E jpgs exceed PIL's default bomb guard

ST_SPOT_SPACING_UM = 200.0  # legacy ST arrays: 100 um spots, 200 um centre to centre
ST_SPOT_DIAMETER_UM = 100.0
VISIUM_SPOT_DIAMETER_UM = 55.0


class SpatialDataError(ValueError):
    """A spatial section cannot be read as given (the message names the file and the problem)."""


# ----------------------------------------------------------------------------- helpers
def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 array [H, W, 3]; a clear error for missing or unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise SpatialDataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for corrupt files
        raise SpatialDataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_image_scaled(path: str | Path, scale: float) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB uint8 image downscaled by ``scale`` (JPEG DCT draft mode when possible) and the full (W, H)."""
    path = Path(path)
    if not path.is_file():
        raise SpatialDataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            full = im.size
            target = (max(1, round(full[0] * scale)), max(1, round(full[1] * scale)))
            im.draft("RGB", target)  # decodes JPEGs at 1/2, 1/4, 1/8 size directly
            small = im.convert("RGB").resize(target, Image.BILINEAR)
            return np.asarray(small), full
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _downsample(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


def _check_counts(x, source: str) -> None:
    data = x.data if sp.issparse(x) else np.asarray(x)
    n_nan = int(np.isnan(data).sum()) if np.issubdtype(data.dtype, np.floating) else 0
    if n_nan:
        raise SpatialDataError(f"{source}: {n_nan} NaN count value(s); counts must be finite")
    n_neg = int((data < 0).sum())
    if n_neg:
        raise SpatialDataError(f"{source}: {n_neg} negative count value(s); counts must be >= 0")


def _median_nn_distance(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        raise SpatialDataError("need at least 2 spots to estimate the spot spacing")
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def _attach_image(
    adata: ad.AnnData,
    library_id: str,
    image: np.ndarray,
    image_path: Path | None,
    microns_per_pixel: float,
    spot_diameter_um: float,
    hires_scale: float,
    already_scaled: bool = False,
) -> None:
    adata.uns["spatial"] = {
        library_id: {
            "images": {"hires": image if already_scaled else _downsample(image, hires_scale)},
            "scalefactors": {
                "tissue_hires_scalef": float(hires_scale),
                "spot_diameter_fullres": float(spot_diameter_um / microns_per_pixel),
                "microns_per_pixel": float(microns_per_pixel),
            },
            "metadata": {"source_image_path": str(image_path) if image_path else ""},
        }
    }


# ----------------------------------------------------------------------------- her2st
def _her2st_image(root: Path, section: str) -> Path:
    cands = sorted(p for p in (root / "ST-imgs").glob(f"**/{section}/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".tif", ".tiff"})
    if not cands:
        raise SpatialDataError(f"{root / 'ST-imgs'}: no image for section {section} (expected ST-imgs/<patient>/{section}/*.jpg)")
    if len(cands) > 1:
        warnings.warn(f"{section}: {len(cands)} images found, using {cands[0].name}", stacklevel=3)
    return cands[0]


def read_her2st(
    root: str | Path,
    section: str,
    *,
    on_mismatch: Literal["warn", "error"] = "warn",
    hires_scale: float = 0.1,
) -> ad.AnnData:
    """Read one section of the her2st layout (``ST-cnts``, ``ST-spotfiles``, ``ST-imgs``).

    Spot ids are ``<x>x<y>`` array coordinates; ``pixel_x/pixel_y`` from the spot file
    give ``obsm['spatial']``.  Spots present in only one of the two files are reported
    (warning with the count, or an error with ``on_mismatch='error'``) and left out.
    """
    root = Path(root)
    cnt_path = root / "ST-cnts" / f"{section}.tsv.gz"
    if not cnt_path.is_file():
        alt = root / "ST-cnts" / f"{section}.tsv"
        if not alt.is_file():
            raise SpatialDataError(f"{cnt_path}: counts file not found")
        cnt_path = alt
    spot_path = root / "ST-spotfiles" / f"{section}_selection.tsv"
    if not spot_path.is_file():
        raise SpatialDataError(f"{spot_path}: spot file not found")
    try:
        counts = pd.read_csv(cnt_path, sep="\t", index_col=0)
    except Exception as e:
        raise SpatialDataError(f"{cnt_path}: cannot parse counts table ({e})") from None
    bad_cols = [c for c in counts.columns if not pd.api.types.is_numeric_dtype(counts[c])]
    if bad_cols:
        raise SpatialDataError(f"{cnt_path}: {len(bad_cols)} non-numeric gene column(s), e.g. {bad_cols[:3]}")
    counts.index = counts.index.astype(str)
    _check_counts(counts.to_numpy(dtype=np.float64), str(cnt_path))

    spots = pd.read_csv(spot_path, sep="\t")
    need = {"x", "y", "pixel_x", "pixel_y"}
    if not need <= set(spots.columns):
        raise SpatialDataError(f"{spot_path}: missing column(s) {sorted(need - set(spots.columns))}")
    if "selected" in spots.columns:
        n_unsel = int((spots["selected"] != 1).sum())
        if n_unsel:
            warnings.warn(f"{spot_path}: {n_unsel} spot(s) not selected (selected != 1), left out", stacklevel=2)
            spots = spots[spots["selected"] == 1]
    spots.index = [f"{int(a)}x{int(b)}" for a, b in zip(spots["x"], spots["y"])]
    if spots.index.duplicated().any():
        raise SpatialDataError(f"{spot_path}: {int(spots.index.duplicated().sum())} duplicated spot id(s)")

    only_cnt = counts.index.difference(spots.index)
    only_spot = spots.index.difference(counts.index)
    if len(only_cnt) or len(only_spot):
        msg = (
            f"{section}: spot ids do not match between {cnt_path.name} and {spot_path.name}: "
            f"{len(only_cnt)} spot(s) have counts but no coordinates (e.g. {list(only_cnt[:3])}), "
            f"{len(only_spot)} have coordinates but no counts (e.g. {list(only_spot[:3])})"
        )
        if on_mismatch == "error":
            raise SpatialDataError(msg)
        warnings.warn(msg + f"; using the {len(counts.index.intersection(spots.index))} common spots", stacklevel=2)
    common = counts.index.intersection(spots.index, sort=False)
    if len(common) == 0:
        raise SpatialDataError(f"{section}: no spot id is shared by {cnt_path} and {spot_path}")
    counts, spots = counts.loc[common], spots.loc[common]

    adata = ad.AnnData(X=sp.csr_matrix(counts.to_numpy(dtype=np.float32)))
    adata.obs_names = list(common)
    adata.var_names = [str(g) for g in counts.columns]
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    adata.obs["array_col"] = spots["x"].to_numpy(int)
    adata.obs["array_row"] = spots["y"].to_numpy(int)
    adata.obs["section"] = section
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    adata.obsm["spatial"] = xy
    img_path = _her2st_image(root, section)
    hires, _ = load_image_scaled(img_path, hires_scale)
    # ST arrays: neighbouring spots are 200 um apart; the median nearest-neighbour distance in px gives the scale
    mpp = ST_SPOT_SPACING_UM / _median_nn_distance(xy)
    _attach_image(adata, section, hires, img_path, mpp, ST_SPOT_DIAMETER_UM, hires_scale, already_scaled=True)
    _check_centres_inside(adata, section)
    return adata


# ----------------------------------------------------------------------------- visium
def read_visium(path: str | Path, *, library_id: str | None = None, source_image_path: str | Path | None = None) -> ad.AnnData:
    """A Space Ranger output folder through :func:`scanpy.read_visium`, with counts checked.

    ``microns_per_pixel`` is derived from Visium's 55 um spot diameter.
    """
    path = Path(path)
    if not path.is_dir():
        raise SpatialDataError(f"{path}: not a Space Ranger output folder")
    for rel in ("filtered_feature_bc_matrix.h5", "spatial/scalefactors_json.json"):
        if not (path / rel).is_file():
            raise SpatialDataError(f"{path / rel}: missing from the Visium folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            adata = sc.read_visium(path, library_id=library_id, source_image_path=source_image_path)
        except Exception as e:
            raise SpatialDataError(f"{path}: scanpy.read_visium failed ({type(e).__name__}: {e})") from None
    adata.var_names_make_unique()
    _check_counts(adata.X, str(path / "filtered_feature_bc_matrix.h5"))
    lib = next(iter(adata.uns["spatial"]))
    entry = adata.uns["spatial"][lib]
    if not entry.get("images"):
        raise SpatialDataError(f"{path / 'spatial'}: no readable tissue image (tissue_hires_image.png)")
    sf = entry["scalefactors"]
    sf["microns_per_pixel"] = VISIUM_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"])
    entry.setdefault("metadata", {})
    entry["metadata"]["source_image_path"] = str(source_image_path) if source_image_path else ""
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    adata.obs["section"] = lib
    _check_centres_inside(adata, str(path))
    return adata


# ----------------------------------------------------------------------------- h5ad
def read_h5ad_section(path: str | Path, *, spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
                      um_per_px: float | None = None) -> ad.AnnData:
    """An ``.h5ad`` holding counts (or none: X may have no columns), ``obsm['spatial']`` and an image in
    ``uns['spatial']``; ``um_per_px`` supplies / overrides the full-resolution micrometres per pixel."""
    path = Path(path)
    if not path.is_file():
        raise SpatialDataError(f"{path}: file not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot read h5ad ({type(e).__name__}: {e})") from None
    if "spatial" not in adata.obsm:
        raise SpatialDataError(f"{path}: no obsm['spatial'] spot coordinates")
    libs = adata.uns.get("spatial", {})
    if len(libs) != 1:
        raise SpatialDataError(f"{path}: expected one library under uns['spatial'], found {len(libs)}")
    lib = next(iter(libs))
    entry = libs[lib]
    images = entry.get("images", {})
    key = "hires" if "hires" in images else ("lowres" if "lowres" in images else None)
    if key is None:
        raise SpatialDataError(f"{path}: uns['spatial']['{lib}'] carries no 'hires' or 'lowres' image")
    img = np.asarray(images[key])
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise SpatialDataError(f"{path}: image '{key}' has shape {img.shape}, expected [H, W, 3]")
    if img.dtype != np.uint8:  # scanpy stores float images in [0, 1]
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    sf = dict(entry.get("scalefactors", {}))
    scalef = sf.get(f"tissue_{key}_scalef")
    if scalef is None:
        raise SpatialDataError(f"{path}: scalefactors lack tissue_{key}_scalef")
    if um_per_px is not None:
        sf["microns_per_pixel"] = float(um_per_px)
    if "microns_per_pixel" not in sf:
        if "spot_diameter_fullres" not in sf:
            raise SpatialDataError(f"{path}: the image's micrometres per pixel are not known: the scalefactors need "
                                   "microns_per_pixel or spot_diameter_fullres, or pass um_per_px=<value>")
        sf["microns_per_pixel"] = spot_diameter_um / float(sf["spot_diameter_fullres"])
    sf.setdefault("spot_diameter_fullres", spot_diameter_um / sf["microns_per_pixel"])
    # normalise to the 'hires' key so downstream code has one convention
    sf["tissue_hires_scalef"] = float(scalef)
    adata.uns["spatial"] = {lib: {"images": {"hires": img[..., :3]}, "scalefactors": sf,
                                  "metadata": {"source_image_path": entry.get("metadata", {}).get("source_image_path", "")}}}
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    _check_counts(adata.X, str(path))
    adata.obs["section"] = lib
    _check_centres_inside(adata, str(path))
    return adata


def read_section(layout: str, *, root: str | Path, section: str, **kw) -> ad.AnnData:
    """Dispatch: ``layout`` in {'her2st', 'visium', 'h5ad'}; ``root/section`` locates the input."""
    root = Path(root)
    if layout == "her2st":
        return read_her2st(root, section, **kw)
    if layout == "visium":
        return read_visium(root / section, library_id=section, **kw)
    if layout == "h5ad":
        p = root / section
        return read_h5ad_section(p if p.suffix == ".h5ad" else p.with_name(p.name + ".h5ad"), **kw)
    raise SpatialDataError(f"unknown layout {layout!r}: use her2st, visium or h5ad")


def _check_centres_inside(adata: ad.AnnData, source: str) -> None:
    entry = next(iter(adata.uns["spatial"].values()))
    img = entry["images"]["hires"]
    s = entry["scalefactors"]["tissue_hires_scalef"]
    xy = adata.obsm["spatial"] * s
    h, w = img.shape[:2]
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h) | ~np.isfinite(xy).all(1)
    if out.any():
        raise SpatialDataError(
            f"{source}: {int(out.sum())} spot centre(s) lie outside the {w / s:.0f}x{h / s:.0f} px image "
            f"(e.g. {list(adata.obs_names[out][:3])}); check the coordinates"
        )


# ----------------------------------------------------------------------------- genes
def load_panel(path: str | Path) -> list[str]:
    """Gene panel from ``.npy`` (array of symbols) or a text file (one symbol per line)."""
    path = Path(path)
    if not path.is_file():
        raise SpatialDataError(f"{path}: panel file not found")
    if path.suffix == ".npy":
        try:  # a plain string array: never unpickle (a pickled .npy can run code)
            genes = [str(g) for g in np.load(path, allow_pickle=False).ravel()]
        except ValueError as e:
            raise SpatialDataError(
                f"{path}: the panel must be a plain array of gene symbols; this file holds pickled Python objects "
                f"and is not loaded ({e}). Re-save it with np.save(path, np.array(genes, dtype=str))") from None
    else:
        genes = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not genes:
        raise SpatialDataError(f"{path}: empty gene panel")
    if len(set(genes)) != len(genes):
        raise SpatialDataError(f"{path}: {len(genes) - len(set(genes))} duplicated gene(s) in the panel")
    return genes


def normalize_log1p(adata: ad.AnnData, target_sum: float = 1e4) -> ad.AnnData:
    """Library-size normalisation over all genes, then log1p (scanpy); returns a copy, raw counts in layers['counts']."""
    out = adata.copy()
    out.layers["counts"] = out.X.copy()
    lib = np.asarray(out.X.sum(1)).ravel()
    n_empty = int((lib <= 0).sum())
    if n_empty:
        raise SpatialDataError(f"section {out.obs['section'].iloc[0] if 'section' in out.obs else '?'}: {n_empty} spot(s) with zero total counts")
    sc.pp.normalize_total(out, target_sum=target_sum)
    sc.pp.log1p(out)
    return out


def apply_panel(
    sections: dict[str, ad.AnnData], genes: Sequence[str], *, on_missing: Literal["error", "warn"] = "error"
) -> tuple[dict[str, ad.AnnData], list[str]]:
    """Subset every section to ``genes`` (panel order).

    Genes absent from some section raise, or with ``on_missing='warn'`` are removed from
    the panel for all sections with a warning naming them and their count.
    """
    check_choice("on_missing_genes", on_missing, ("error", "warn"), "apply_panel")
    missing: dict[str, list[str]] = {}
    for name, a in sections.items():
        miss = [g for g in genes if g not in a.var_names]
        if miss:
            missing[name] = miss
    if missing:
        allmiss = sorted({g for m in missing.values() for g in m})
        detail = "; ".join(f"{k}: {len(v)} (e.g. {v[:3]})" for k, v in missing.items())
        msg = f"{len(allmiss)} panel gene(s) missing from some sections: {detail}"
        if on_missing == "error":
            raise SpatialDataError(msg)
        warnings.warn(msg + f"; removed from the panel, {len(genes) - len(allmiss)} genes kept", stacklevel=2)
        genes = [g for g in genes if g not in set(allmiss)]
    if not genes:
        raise SpatialDataError("no panel gene is present in every section")
    return {k: a[:, list(genes)].copy() for k, a in sections.items()}, list(genes)


def select_hvg_panel(train_sections: Iterable[ad.AnnData], n_top: int) -> list[str]:
    """Top-``n_top`` highly variable genes (scanpy 'seurat' flavour) on log-normalised *training* sections.

    Only genes measured in every training section are eligible.
    """
    train = list(train_sections)
    common = set(train[0].var_names)
    for a in train[1:]:
        common &= set(a.var_names)
    genes = [g for g in train[0].var_names if g in common]
    cat = ad.concat([a[:, genes] for a in train], join="inner", label="batch_key", index_unique="-")
    n_top = min(n_top, cat.n_vars)
    sc.pp.highly_variable_genes(cat, n_top_genes=n_top, flavor="seurat", batch_key="batch_key" if len(train) > 1 else None)
    hv = cat.var.sort_values("dispersions_norm", ascending=False)
    hv = hv[hv["highly_variable"]]
    return list(hv.index[:n_top])
