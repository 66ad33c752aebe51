"""H&E patches around spots, and their training augmentation.

A patch of ``size`` (in um or full-resolution px) is cut centred on each spot's
``obsm['spatial']`` position, from the full-resolution image when the section names
one, else from ``uns['spatial'][lib]['images']['hires']``; it is resized to ``out_px``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import torch
from PIL import Image

from armodal.modalities.spatial.io import SpatialDataError, load_image

__all__ = ["patch_size_px", "patch_boxes", "patch_plan", "extract_patches", "augment", "stain_jitter", "rgb_to_hed", "hed_to_rgb",
           "dihedral"]

# Ruifrok & Johnston stain vectors, as in skimage.color (rows: haematoxylin, eosin, DAB)
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LOG_ADJUST = float(np.log(1e-6))


def _entry(adata: ad.AnnData) -> dict:
    return next(iter(adata.uns["spatial"].values()))


def patch_size_px(adata: ad.AnnData, size: float, unit: Literal["um", "px"]) -> float:
    """Patch edge in full-resolution pixels."""
    if unit == "px":
        return float(size)
    if unit == "um":
        return float(size) / float(_entry(adata)["scalefactors"]["microns_per_pixel"])
    raise ValueError(f"patch unit must be 'um' or 'px', got {unit!r}")


def patch_boxes(xy: np.ndarray, size: int) -> np.ndarray:
    """Integer boxes [N, 4] (left, top, right, bottom), ``size`` px wide, centred on ``xy`` [N, 2].

    The box centre ``left + size / 2`` is within half a pixel of the spot.
    """
    left = np.floor(xy[:, 0] - size / 2 + 0.5).astype(int)
    top = np.floor(xy[:, 1] - size / 2 + 0.5).astype(int)
    return np.stack([left, top, left + size, top + size], axis=1)


def _source(adata: ad.AnnData) -> tuple[str, float, tuple[int, int]]:
    """(full-res image path or '', scale from full-res px to the source image, source (W, H))."""
    entry = _entry(adata)
    src = entry.get("metadata", {}).get("source_image_path", "")
    section = str(adata.obs["section"].iloc[0]) if "section" in adata.obs else "section"
    if src:
        if not Path(src).is_file():
            raise SpatialDataError(f"{src}: full-resolution image of {section} not found")
        try:
            with Image.open(src) as im:
                return src, 1.0, im.size
        except Exception as e:
            raise SpatialDataError(f"{src}: cannot read image ({type(e).__name__}: {e})") from None
    img = np.asarray(entry["images"]["hires"])
    return "", float(entry["scalefactors"]["tissue_hires_scalef"]), (img.shape[1], img.shape[0])


def patch_plan(
    adata: ad.AnnData,
    *,
    size: float = 160.0,
    unit: Literal["um", "px"] = "um",
    outside: Literal["pad", "drop", "error"] = "pad",
) -> tuple[np.ndarray, np.ndarray]:
    """Patch boxes in the source image [N, 4] and the spots kept (bool [N]); no pixels are read.

    Patches that reach beyond the image are padded with white (``outside='pad'``), dropped
    (``'drop'``), or raise (``'error'``); the first two warn with the count.
    """
    _, scale, (w, h) = _source(adata)
    section = str(adata.obs["section"].iloc[0]) if "section" in adata.obs else "section"
    size_img = max(2, int(round(patch_size_px(adata, size, unit) * scale)))
    boxes = patch_boxes(np.asarray(adata.obsm["spatial"], dtype=np.float64) * scale, size_img)
    beyond = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > w) | (boxes[:, 3] > h)
    n_out = int(beyond.sum())
    if n_out:
        msg = f"{section}: {n_out} spot(s) have patches ({size:g} {unit}) reaching outside the {w}x{h} image"
        if outside == "error":
            raise SpatialDataError(msg + f" (e.g. {list(adata.obs_names[beyond][:3])})")
        if outside not in ("pad", "drop"):
            raise ValueError(f"outside must be pad, drop or error, got {outside!r}")
        warnings.warn(msg + ("; padded with white" if outside == "pad" else "; those spots are dropped"), stacklevel=2)
    kept = ~beyond if outside == "drop" else np.ones(len(boxes), bool)
    return boxes, kept


def extract_patches(
    adata: ad.AnnData,
    *,
    size: float = 160.0,
    unit: Literal["um", "px"] = "um",
    out_px: int = 64,
    outside: Literal["pad", "drop", "error"] = "pad",
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one RGB patch per spot -> (patches uint8 [N', out_px, out_px, 3], kept bool [N]).

    See :func:`patch_plan` for spots whose patch reaches beyond the image.
    """
    boxes, kept = patch_plan(adata, size=size, unit=unit, outside=outside)
    src, _, _ = _source(adata)
    image = load_image(src) if src else np.asarray(_entry(adata)["images"]["hires"])
    h, w = image.shape[:2]
    out = np.empty((int(kept.sum()), out_px, out_px, 3), np.uint8)
    for j, (l, t, r, b) in enumerate(boxes[kept]):
        size_img = r - l
        canvas = np.full((size_img, size_img, 3), 255, np.uint8)
        cl, ct, cr, cb = max(l, 0), max(t, 0), min(r, w), min(b, h)
        if cr > cl and cb > ct:
            canvas[ct - t : cb - t, cl - l : cr - l] = image[ct:cb, cl:cr, :3]
        out[j] = np.asarray(Image.fromarray(canvas).resize((out_px, out_px), Image.BILINEAR))
    return out, kept


# ----------------------------------------------------------------------------- augmentation
def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] RGB in [0, 1] -> stain concentrations (skimage.color.rgb2hed convention,
    without its clipping at 0, so that :func:`hed_to_rgb` inverts it exactly)."""
    x = rgb.clamp_min(1e-6).log() / _LOG_ADJUST  # optical density, [..., 3, H, W]
    return torch.einsum("...chw,cd->...dhw", x, _HED_FROM_RGB.to(rgb))


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`rgb_to_hed` -> RGB in [0, 1]."""
    log_rgb = -(hed * -_LOG_ADJUST)
    return torch.einsum("...chw,cd->...dhw", log_rgb, _RGB_FROM_HED.to(hed)).exp().clamp(0, 1)


def stain_jitter(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image of ``x`` [B, 3, H, W] (RGB in [0, 1]): HED scale ``1 + U(-s, s)`` and shift ``U(-s, s)`` on the
    natural optical density -- :func:`~.stain.perturb_slide_stain`'s change, drawn per image."""
    from armodal.modalities.spatial.stain import _HED_FROM_RGB, _RGB_FROM_HED  # noqa: PLC0415 (stain imports nothing from here)

    b = x.shape[0]
    alpha = 1 + sigma * (2 * torch.rand(b, 3, generator=generator) - 1)
    beta = sigma * (2 * torch.rand(b, 3, generator=generator) - 1)
    m_in = torch.tensor(_HED_FROM_RGB, dtype=x.dtype)
    m_out = torch.tensor(_RGB_FROM_HED, dtype=x.dtype)
    lin = m_in[None] * alpha.to(x.dtype)[:, None, :] @ m_out  # [B, 3, 3]: od @ inv(M) diag(alpha) M
    off = (beta.to(x.dtype) @ m_out)[:, :, None, None]  # [B, 3, 1, 1]
    od = -torch.log(x.clamp_min(1.0 / 255.0))
    return torch.exp(-(torch.einsum("bchw,bcd->bdhw", od, lin) + off)).clamp(0, 1)


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 symmetries of the square: k in 0..7 (rot90 k % 4, then a flip if k >= 4)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def augment(
    x: torch.Tensor,  # [B, 3, H, W] RGB in [0, 1]
    generator: torch.Generator | None = None,
    *,
    hed_sigma: float = 0.05,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
    stain_sigma: float = 0.0,
) -> torch.Tensor:
    """Training augmentation: random flips and 90-degree rotations, HED stain jitter, colour jitter.

    ``hed_sigma`` jitters in skimage's HED units (optical density / ln(1e6): 0.05 already tints the white
    background strongly, the SSL stage's colour augmentation); ``stain_sigma`` applies a realistic stain
    change per patch on the natural optical density, the scale of :data:`~.stain.STAIN_STRENGTHS`."""
    b = x.shape[0]
    g = generator

    def u(*shape, lo=-1.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    ks = torch.randint(0, 8, (b,), generator=g).tolist()
    x = torch.stack([dihedral(xi, k) for xi, k in zip(x, ks)])
    if hed_sigma > 0:  # Tellez et al. 2018: per-stain scale and shift
        hed = rgb_to_hed(x)
        alpha = 1 + hed_sigma * u(b, 3, 1, 1)
        beta = hed_sigma * u(b, 3, 1, 1)
        x = hed_to_rgb(hed * alpha + beta)
    if stain_sigma > 0:
        x = stain_jitter(x, stain_sigma, g)
    if brightness > 0:
        x = x * (1 + brightness * u(b, 1, 1, 1))
    if contrast > 0:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * (1 + contrast * u(b, 1, 1, 1)) + m
    if saturation > 0:
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * (1 + saturation * u(b, 1, 1, 1)) + grey
    return x.clamp(0, 1)
