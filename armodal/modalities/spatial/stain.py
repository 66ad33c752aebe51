"""Stain normalisation (Macenko, Reinhard) fitted per *slide*, and slide-level stain perturbation.

Both normalisers estimate the source statistics once per slide, on the tissue pixels of a
downsampled whole-slide image, and then apply one fixed colour transform to every patch
of that slide.  (Fitting per patch, as ``torchstain``'s ``normalize`` does, would also
remove the patch-to-patch differences in stain density that carry the signal.)

* Macenko et al., ISBI 2009: optical density (OD) ``-log((I + 1) / Io)``; the two stain
  vectors are the extreme angles (``alpha`` / ``100 - alpha`` percentiles) of the tissue
  ODs projected on their top-2 principal plane; concentrations by least squares; the
  99th-percentile concentration of each stain is matched to the reference's.  As a
  colour map this is linear in OD space: ``OD' = HE_ref diag(maxC_ref / maxC) pinv(HE) OD``.
* Reinhard et al. 2001: per-channel mean / std matching in CIELAB (D65, sRGB).

The reference is fitted on one or more slides (the training sections) and stored in the
normaliser's ``state()`` so that a saved model normalises a new slide the same way.

:func:`perturb_slide_stain` is the robustness check's perturbation: one random scale and
shift per stain channel in HED space (Tellez et al. 2018) for the whole slide, drawn from
a fixed seed at a named strength.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "MACENKO_HE_REF",
    "MACENKO_MAXC_REF",
    "STAIN_STRENGTHS",
    "rgb_to_od",
    "od_to_rgb",
    "rgb_to_lab",
    "lab_to_rgb",
    "tissue_pixels",
    "macenko_stains",
    "StainNormalizer",
    "perturb_slide_stain",
]

# Reference stain vectors (columns: haematoxylin, eosin) and 99th-percentile concentrations
# of Macenko's reference implementation (as in torchstain / HEnorm_python).
MACENKO_HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MACENKO_MAXC_REF = np.array([1.9705, 1.0308])

# HED perturbation strengths of the robustness check: sigma of the per-stain scale (1 +- sigma)
# and shift (+- sigma) -- Tellez et al.'s "HED-light" is 0.05, "HED-strong" 0.2.
STAIN_STRENGTHS = {"low": 0.05, "medium": 0.1, "high": 0.2}

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in skimage.color
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


# ----------------------------------------------------------------------------- colour spaces
def rgb_to_od(rgb: np.ndarray, io: float = 240.0) -> np.ndarray:
    """uint8 / float RGB [..., 3] in 0..255 -> optical density [..., 3] (Macenko's convention)."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / io)


def od_to_rgb(od: np.ndarray, io: float = 240.0) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`, clipped to uint8."""
    return np.clip(np.rint(io * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


_M_RGB_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_WHITE_D65 = np.array([0.950456, 1.0, 1.088754])


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB uint8 [..., 3] -> CIELAB (D65) [..., 3]; L in [0, 100]."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = lin @ _M_RGB_XYZ.T / _WHITE_D65
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) [..., 3] -> sRGB uint8 [..., 3] (clipped to the gamut)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    xyz = np.where(f > 0.206893, f**3, (f - 16.0 / 116.0) / 7.787) * _WHITE_D65
    lin = np.clip(xyz @ np.linalg.inv(_M_RGB_XYZ).T, 0, None)
    c = np.where(lin > 0.0031308, 1.055 * lin ** (1 / 2.4) - 0.055, 12.92 * lin)
    return np.clip(np.rint(c * 255.0), 0, 255).astype(np.uint8)


def tissue_pixels(rgb: np.ndarray, beta: float = 0.15, io: float = 240.0, max_pixels: int = 200_000,
                  seed: int = 0) -> np.ndarray:
    """Tissue pixels [N, 3] uint8 of an RGB image: optical density >= ``beta`` in every channel
    (Macenko's transparency threshold); at most ``max_pixels`` of them, a fixed-seed subset."""
    px = np.asarray(rgb)[..., :3].reshape(-1, 3)
    keep = (rgb_to_od(px, io) >= beta).all(1)
    px = px[keep]
    if len(px) > max_pixels:
        px = px[np.random.default_rng(seed).choice(len(px), max_pixels, replace=False)]
    return px


# ----------------------------------------------------------------------------- Macenko
def macenko_stains(pixels: np.ndarray, io: float = 240.0, alpha: float = 1.0, beta: float = 0.15
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Stain matrix [3, 2] (unit columns: haematoxylin, eosin) and 99th-percentile concentrations [2]
    of the tissue ``pixels`` [N, 3] (uint8 RGB)."""
    od = rgb_to_od(pixels, io).reshape(-1, 3)
    od = od[(od >= beta).all(1)]
    if len(od) < 10:
        raise ValueError(f"Macenko stain estimation needs tissue pixels; only {len(od)} have OD >= {beta}")
    _, vecs = np.linalg.eigh(np.cov(od.T))
    plane = vecs[:, [1, 2]]  # the two largest eigenvalues
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v1, v2], 1) if v1[0] > v2[0] else np.stack([v2, v1], 1)  # haematoxylin: the larger red OD
    he = he * np.sign(he.sum(0, keepdims=True))  # ODs are positive
    he = he / np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]  # [2, N]
    return he, np.percentile(conc, 99, axis=1)


class StainNormalizer:
    """Slide-level stain normalisation to a reference: ``method`` in {'none', 'macenko', 'reinhard'}.

    ``fit_reference(images)`` sets the reference from one or more slides (their statistics
    are averaged); without it Macenko uses the literature reference and Reinhard refuses.
    ``slide_transform(image)`` estimates one slide's statistics and returns a function that
    maps any RGB array of that slide (a patch or the whole image) to the reference.
    """

    def __init__(self, method: Literal["none", "macenko", "reinhard"] = "none", io: float = 240.0,
                 reference: dict | None = None, beta: float = 0.15) -> None:
        if method not in ("none", "macenko", "reinhard"):
            raise ValueError(f"stain normalisation must be 'none', 'macenko' or 'reinhard', got {method!r}")
        self.method, self.io, self.beta = method, float(io), float(beta)
        self.reference = dict(reference or {})
        if method == "macenko" and not self.reference:
            self.reference = {"he": MACENKO_HE_REF.tolist(), "maxc": MACENKO_MAXC_REF.tolist()}

    # -- statistics -------------------------------------------------------------------
    def slide_stats(self, image: np.ndarray) -> dict:
        px = tissue_pixels(image, beta=self.beta, io=self.io)
        if self.method == "macenko":
            he, maxc = macenko_stains(px, self.io, beta=self.beta)
            return {"he": he.tolist(), "maxc": maxc.tolist()}
        if self.method == "reinhard":
            if len(px) < 10:
                raise ValueError(f"Reinhard normalisation needs tissue pixels; found {len(px)}")
            lab = rgb_to_lab(px)
            return {"mean": lab.mean(0).tolist(), "std": (lab.std(0) + 1e-6).tolist()}
        return {}

    def fit_reference(self, images: list[np.ndarray]) -> "StainNormalizer":
        stats = [self.slide_stats(im) for im in images]
        if self.method == "macenko":
            he = np.mean([s["he"] for s in stats], 0)
            self.reference = {"he": (he / np.linalg.norm(he, axis=0, keepdims=True)).tolist(),
                              "maxc": np.mean([s["maxc"] for s in stats], 0).tolist()}
        elif self.method == "reinhard":
            self.reference = {"mean": np.mean([s["mean"] for s in stats], 0).tolist(),
                              "std": np.mean([s["std"] for s in stats], 0).tolist()}
        return self

    # -- application ---------------------------------------------------------------------
    def slide_transform(self, image: np.ndarray):
        """-> f(rgb uint8 [..., 3]) -> uint8 [..., 3], the map fitted on this slide."""
        if self.method == "none":
            return lambda rgb: np.asarray(rgb, dtype=np.uint8)
        if self.method == "reinhard" and not self.reference:
            raise ValueError("Reinhard normalisation needs a reference: call fit_reference(training slides) first")
        return self.transform_from_stats(self.slide_stats(image))

    def transform_from_stats(self, stats: dict):
        io = self.io
        if self.method == "macenko":
            he, maxc = np.asarray(stats["he"]), np.asarray(stats["maxc"])
            he_ref, maxc_ref = np.asarray(self.reference["he"]), np.asarray(self.reference["maxc"])
            m = he_ref @ np.diag(maxc_ref / np.maximum(maxc, 1e-6)) @ np.linalg.pinv(he)  # [3, 3] on OD

            def apply(rgb):
                rgb = np.asarray(rgb)
                return od_to_rgb(rgb_to_od(rgb[..., :3], io) @ m.T, io)

            return apply
        if self.method == "reinhard":
            mu, sd = np.asarray(stats["mean"]), np.asarray(stats["std"])
            mu_r, sd_r = np.asarray(self.reference["mean"]), np.asarray(self.reference["std"])

            def apply(rgb):
                lab = rgb_to_lab(np.asarray(rgb)[..., :3])
                return lab_to_rgb((lab - mu) / sd * sd_r + mu_r)

            return apply
        return lambda rgb: np.asarray(rgb, dtype=np.uint8)

    def state(self) -> dict:
        return {"method": self.method, "io": self.io, "reference": self.reference, "beta": self.beta}

    @classmethod
    def from_state(cls, state: dict) -> "StainNormalizer":
        return cls(state.get("method", "none"), state.get("io", 240.0), state.get("reference"), state.get("beta", 0.15))


# ----------------------------------------------------------------------------- perturbation
def perturb_slide_stain(rgb: np.ndarray, strength: float | str, seed: int) -> np.ndarray:
    """A slide's RGB image (uint8 [H, W, 3]) with its stains changed: in HED space (Ruifrok-Johnston
    colour deconvolution of the natural optical density ``-log(I / 255)``), each stain channel gets
    one scale ``1 + U(-s, s)`` and one shift ``U(-s, s)`` for the whole slide (``s`` = ``strength``,
    a number or a name in :data:`STAIN_STRENGTHS`), drawn from ``seed``."""
    s = STAIN_STRENGTHS[strength] if isinstance(strength, str) else float(strength)
    rng = np.random.default_rng(seed)
    alpha = 1.0 + rng.uniform(-s, s, 3)
    beta = rng.uniform(-s, s, 3)
    # od' = ((od @ inv(M)) * alpha + beta) @ M : an affine map of the optical density
    lin = _HED_FROM_RGB @ np.diag(alpha) @ _RGB_FROM_HED
    off = beta @ _RGB_FROM_HED
    rgb = np.asarray(rgb)[..., :3]
    out = np.empty(rgb.shape, np.uint8)
    for a in range(0, rgb.shape[0], 512):  # row blocks: whole-slide images are large
        od = -np.log(np.maximum(rgb[a : a + 512].astype(np.float64), 1.0) / 255.0)
        out[a : a + 512] = np.clip(np.rint(255.0 * np.exp(-(od @ lin + off))), 0, 255).astype(np.uint8)
    return out
