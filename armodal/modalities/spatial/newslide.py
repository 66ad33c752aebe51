"""A new slide without counts -> a section the spatial model can predict on.

What a pathologist runs: an H&E image and where to predict --

* ``spots=<file>.csv``: spot centres in full-resolution pixels (columns ``x, y``,
  ``pixel_x, pixel_y`` or Space Ranger's ``pxl_col_in_fullres, pxl_row_in_fullres``;
  an optional ``id`` / ``barcode`` column names the spots);
* ``spots=grid``: a square grid of spots ``spot_um`` apart over the tissue, found by a
  simple tissue mask (optical density above a threshold, cleaned by morphology);
* a Visium ``spatial/`` folder (positions, scale factors, hires image; no count matrix
  needed) or an ``.h5ad`` holding ``obsm['spatial']`` and an image in ``uns['spatial']``.

The image's micrometres per pixel must be known -- from the Visium scale factors (55 um
spots), the ``.h5ad``'s scale factors, or ``um_per_px=`` -- never guessed: the patch size
and the grid are physical lengths.  Spots whose centre is off the image are warned
about (with their count) and dropped.

The result is an AnnData with no genes (``X`` is [n, 0]) in the readers' convention
(``obsm['spatial']`` in full-resolution pixels, ``uns['spatial'][lib]`` with the image,
``scalefactors`` and ``metadata['source_image_path']``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image

from armodal.modalities.spatial.io import SpatialDataError, load_image_scaled

__all__ = ["new_section", "read_spots_csv", "tissue_mask", "grid_spots", "HIRES_MAX_SIDE"]

HIRES_MAX_SIDE = 2000  # longest side of the downsampled image kept for plotting and masks
_XY_COLUMNS = (("x", "y"), ("pixel_x", "pixel_y"), ("pxl_col_in_fullres", "pxl_row_in_fullres"))
_VISIUM_SPOT_UM = 55.0


def tissue_mask(rgb: np.ndarray, od_threshold: float = 0.15, min_fraction: float = 0.001) -> np.ndarray:
    """Boolean tissue mask of an RGB image [H, W, 3]: mean optical density (``-log10``-free natural
    OD of ``(I + 1) / 256``) above ``od_threshold``, closed and opened by a 5-px disc, holes filled,
    and components smaller than ``min_fraction`` of the image removed."""
    from scipy import ndimage

    od = -np.log((np.asarray(rgb)[..., :3].astype(np.float64) + 1.0) / 256.0).mean(-1)
    m = od > od_threshold
    disc = np.hypot(*np.mgrid[-2:3, -2:3]) <= 2.0
    m = ndimage.binary_opening(ndimage.binary_closing(m, disc, iterations=2), disc)
    m = ndimage.binary_fill_holes(m)
    lab, n = ndimage.label(m)
    if n:
        sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= min_fraction * m.size) + 1
        m = np.isin(lab, keep)
    return m


def grid_spots(mask: np.ndarray, mask_scale: float, spacing_px: float) -> np.ndarray:
    """Centres [n, 2] (full-resolution px) of a square grid ``spacing_px`` apart whose points fall on
    the ``mask`` (a tissue mask of the image downscaled by ``mask_scale``)."""
    h, w = mask.shape
    full_w, full_h = w / mask_scale, h / mask_scale
    xs = np.arange(spacing_px / 2, full_w, spacing_px)
    ys = np.arange(spacing_px / 2, full_h, spacing_px)
    xy = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    ix = np.clip((xy[:, 0] * mask_scale).astype(int), 0, w - 1)
    iy = np.clip((xy[:, 1] * mask_scale).astype(int), 0, h - 1)
    return xy[mask[iy, ix]]


def read_spots_csv(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Spot centres [n, 2] in full-resolution pixels and spot names from a CSV / TSV file."""
    path = Path(path)
    if not path.is_file():
        raise SpatialDataError(f"{path}: spots file not found")
    try:
        df = pd.read_csv(path, sep=None, engine="python")
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot parse spots table ({type(e).__name__}: {e})") from None
    cols = next(((a, b) for a, b in _XY_COLUMNS if a in df.columns and b in df.columns), None)
    if cols is None:
        raise SpatialDataError(f"{path}: needs spot-centre columns in pixels, one of "
                               f"{', '.join('/'.join(c) for c in _XY_COLUMNS)}; found {list(df.columns)}")
    xy = df[list(cols)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        raise SpatialDataError(f"{path}: {int(bad.sum())} row(s) with a missing or non-numeric {cols[0]}/{cols[1]} "
                               f"(e.g. rows {(np.flatnonzero(bad)[:3] + 2).tolist()})")
    if len(xy) == 0:
        raise SpatialDataError(f"{path}: no spots")
    name_col = next((c for c in ("id", "barcode", "spot") if c in df.columns), None)
    names = [str(v) for v in df[name_col]] if name_col else [f"spot{i}" for i in range(len(xy))]
    if len(set(names)) != len(names):
        raise SpatialDataError(f"{path}: {len(names) - len(set(names))} duplicated spot name(s) in column {name_col!r}")
    return xy, names


def _um_per_px_required(source: str) -> SpatialDataError:
    return SpatialDataError(f"{source}: the image's micrometres per pixel are not known; pass um_per_px=<value> "
                            "(e.g. um_per_px=0.5 for a 20x scan); it is never guessed because patch sizes and "
                            "the spot grid are physical lengths")


def _read_visium_positions(folder: Path) -> tuple[np.ndarray, list[str], dict, Path]:
    sdir = folder / "spatial" if (folder / "spatial").is_dir() else folder
    sf_path = sdir / "scalefactors_json.json"
    if not sf_path.is_file():
        raise SpatialDataError(f"{sf_path}: missing from the Visium folder")
    sf = json.loads(sf_path.read_text())
    pos_new, pos_old = sdir / "tissue_positions.csv", sdir / "tissue_positions_list.csv"
    names = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    if pos_new.is_file():
        df = pd.read_csv(pos_new)
    elif pos_old.is_file():
        df = pd.read_csv(pos_old, header=None, names=names)
    else:
        raise SpatialDataError(f"{sdir}: no tissue_positions.csv or tissue_positions_list.csv")
    if not set(names) <= set(df.columns):
        raise SpatialDataError(f"{sdir}: tissue positions lack column(s) {sorted(set(names) - set(df.columns))}")
    df = df[df["in_tissue"] == 1]
    img = next((sdir / f for f in ("tissue_hires_image.png", "tissue_lowres_image.png") if (sdir / f).is_file()), None)
    if img is None:
        raise SpatialDataError(f"{sdir}: no tissue_hires_image.png / tissue_lowres_image.png")
    key = "tissue_hires_scalef" if img.name.startswith("tissue_hires") else "tissue_lowres_scalef"
    if key not in sf or "spot_diameter_fullres" not in sf:
        raise SpatialDataError(f"{sf_path}: needs {key} and spot_diameter_fullres")
    xy = df[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    return xy, [str(b) for b in df["barcode"]], {"scale": float(sf[key]), "spot_diameter_fullres": float(sf["spot_diameter_fullres"])}, img


def new_section(
    *,
    image: str | Path | None = None,
    spots: str | Path | None = None,
    um_per_px: float | None = None,
    spot_um: float | None = None,
    visium: str | Path | None = None,
    h5ad: str | Path | None = None,
    name: str | None = None,
) -> ad.AnnData:
    """A count-free section to predict on (see the module docstring for the inputs).

    ``image`` + ``spots`` (a CSV path or ``'grid'``, the latter with ``spot_um``); or
    ``visium`` (a Space Ranger folder; ``image`` may add the full-resolution image); or
    ``h5ad``.  ``um_per_px`` overrides / supplies the image scale.
    """
    if sum(x is not None for x in (visium, h5ad, spots)) != 1:
        raise SpatialDataError("give exactly one of spots=<csv | grid> (with image=), visium=<folder> or h5ad=<file>")
    if um_per_px is not None and not float(um_per_px) > 0:
        raise SpatialDataError(f"um_per_px={um_per_px}: must be a positive number of micrometres per pixel")
    hires_img, scale, source = None, 1.0, ""
    if h5ad is not None:
        return _from_h5ad(Path(h5ad), um_per_px, name)
    if visium is not None:
        folder = Path(visium)
        if not folder.is_dir():
            raise SpatialDataError(f"{folder}: not a Visium (Space Ranger) folder")
        xy, names, sf, img_path = _read_visium_positions(folder)
        mpp = float(um_per_px) if um_per_px is not None else _VISIUM_SPOT_UM / sf["spot_diameter_fullres"]
        if image is not None:  # the full-resolution image: patches come from it
            source = str(image)
            hires_img, full = _hires(Path(image))
            scale = hires_img.shape[1] / full[0]
        else:
            hires_img, scale = np.asarray(Image.open(img_path).convert("RGB")), sf["scale"]
        name = name or folder.name
    else:
        if image is None:
            raise SpatialDataError("spots= needs image=<H&E image file>")
        if um_per_px is None:
            raise _um_per_px_required(str(image))
        mpp = float(um_per_px)
        source = str(image)
        hires_img, full = _hires(Path(image))
        scale = hires_img.shape[1] / full[0]
        if str(spots) == "grid":
            if spot_um is None or not float(spot_um) > 0:
                raise SpatialDataError("spots=grid needs spot_um=<centre-to-centre spacing in micrometres>, e.g. spot_um=100")
            mask = tissue_mask(hires_img)
            if not mask.any():
                raise SpatialDataError(f"{image}: the tissue mask is empty (no pixel darker than the background)")
            xy = grid_spots(mask, scale, float(spot_um) / mpp)
            if len(xy) == 0:
                raise SpatialDataError(f"{image}: a {spot_um} um grid places no spot on the tissue")
            names = [f"grid{i}" for i in range(len(xy))]
        else:
            xy, names = read_spots_csv(spots)
        name = name or Path(image).stem
    full_w, full_h = hires_img.shape[1] / scale, hires_img.shape[0] / scale
    off = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= full_w) | (xy[:, 1] >= full_h)
    if off.any():
        warnings.warn(f"{name}: {int(off.sum())} of {len(xy)} spot(s) lie off the {full_w:.0f}x{full_h:.0f} px image "
                      f"(e.g. {[names[i] for i in np.flatnonzero(off)[:3]]}); they are dropped", stacklevel=2)
        xy, names = xy[~off], [n for n, o in zip(names, off) if not o]
    if len(xy) == 0:
        raise SpatialDataError(f"{name}: no spot lies on the image")
    a = ad.AnnData(X=np.zeros((len(xy), 0), np.float32))
    a.obs_names = names
    a.obs["section"] = name
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {name: {"images": {"hires": hires_img},
                               "scalefactors": {"tissue_hires_scalef": float(scale), "microns_per_pixel": mpp,
                                                "spot_diameter_fullres": float((spot_um or 55.0) / mpp)},
                               "metadata": {"source_image_path": source}}}
    return a


def _hires(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    if not path.is_file():
        raise SpatialDataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        raise SpatialDataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return load_image_scaled(path, min(1.0, HIRES_MAX_SIDE / max(w, h)))


def _from_h5ad(path: Path, um_per_px: float | None, name: str | None) -> ad.AnnData:
    from armodal.modalities.spatial.io import read_h5ad_section

    a = read_h5ad_section(path, um_per_px=um_per_px)
    a = ad.AnnData(X=np.zeros((a.n_obs, 0), np.float32), obs=a.obs[[]].copy(), obsm={"spatial": a.obsm["spatial"]},
                   uns={"spatial": a.uns["spatial"]})
    a.obs["section"] = name or next(iter(a.uns["spatial"]))
    return a
