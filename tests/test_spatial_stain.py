"""Stain normalisation (slide-level Macenko / Reinhard) and the robustness check's perturbation,
against hand-built cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from armodal.modalities.spatial.stain import (
    STAIN_STRENGTHS,
    StainNormalizer,
    lab_to_rgb,
    macenko_stains,
    perturb_slide_stain,
    rgb_to_lab,
    rgb_to_od,
)

IO = 240.0
HE_TRUE = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])
HE_TRUE = HE_TRUE / np.linalg.norm(HE_TRUE, axis=0, keepdims=True)


def _synthetic_slide(he: np.ndarray, n: int = 4000, seed: int = 0, lo: float = 0.3, hi: float = 1.5
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Float RGB pixels [n, 3] made of two stains with known concentrations [2, n]: 10 % pure
    haematoxylin, 10 % pure eosin, the rest mixtures."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(lo, hi, (2, n))
    c[1, : n // 10] = 0.0  # pure H
    c[0, n // 10 : n // 5] = 0.0  # pure E
    od = he @ c
    return (IO * np.exp(-od) - 1.0).T, c


def test_lab_known_values_and_round_trip():
    lab = rgb_to_lab(np.array([[255, 255, 255], [255, 0, 0], [0, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.01)
    np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.02)  # sRGB red, D65
    np.testing.assert_allclose(lab[2], [0.0, 0.0, 0.0], atol=0.01)
    rgb = np.random.default_rng(0).integers(0, 256, (500, 3)).astype(np.uint8)
    np.testing.assert_array_equal(lab_to_rgb(rgb_to_lab(rgb)), rgb)


def test_macenko_recovers_known_stains_and_concentrations():
    px, c = _synthetic_slide(HE_TRUE)
    he, maxc = macenko_stains(px, io=IO, alpha=1.0, beta=0.0)  # every synthetic pixel is stain
    np.testing.assert_allclose(he, HE_TRUE, atol=1e-6)
    np.testing.assert_allclose(maxc, np.percentile(c, 99, axis=1), rtol=1e-6)


def test_macenko_normalisation_known_answer():
    """Pixels of a slide stained with HE_TRUE map to the image the reference stains would give for
    the same concentrations, rescaled by the 99th-percentile ratio."""
    px, c = _synthetic_slide(HE_TRUE)
    he_ref = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
    maxc_ref = np.array([1.9705, 1.0308])
    norm = StainNormalizer("macenko", io=IO, reference={"he": he_ref.tolist(), "maxc": maxc_ref.tolist()}, beta=0.0)
    out = norm.slide_transform(px.reshape(-1, 1, 3))(px)
    scale = maxc_ref / np.percentile(c, 99, axis=1)
    expect = np.clip(np.rint(IO * np.exp(-(he_ref @ (c * scale[:, None]))).T - 1.0), 0, 255)
    assert np.abs(out.astype(float) - expect).max() <= 1.0


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalising_a_normalised_slide_changes_little(method):
    other = np.array([[0.55, 0.25], [0.78, 0.90], [0.30, 0.35]])
    other = other / np.linalg.norm(other, axis=0, keepdims=True)
    ref_px, _ = _synthetic_slide(HE_TRUE, seed=1, lo=0.2, hi=0.9)
    px, _ = _synthetic_slide(other, seed=2, lo=0.26, hi=1.2)
    img = np.clip(np.rint(px), 0, 255).astype(np.uint8).reshape(40, 100, 3)
    norm = StainNormalizer(method, io=IO).fit_reference([np.clip(np.rint(ref_px), 0, 255).astype(np.uint8).reshape(40, 100, 3)])
    once = norm.slide_transform(img)(img)
    twice = norm.slide_transform(once)(once)
    first_change = np.abs(once.astype(float) - img).mean()
    second_change = np.abs(twice.astype(float) - once).mean()
    assert first_change > 15.0  # the slide's stains really differed from the reference (mean |change| in 0..255)
    # an already normalised slide is (nearly) a fixed point: Macenko exactly up to rounding; Reinhard up to
    # the tissue mask (OD >= 0.15 in every channel), which selects slightly different pixels after the change
    assert second_change < (0.5 if method == "macenko" else 0.2 * first_change)


def test_reinhard_matches_reference_statistics():
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (50, 60, 3)).astype(np.uint8)
    ref = rng.integers(90, 220, (40, 40, 3)).astype(np.uint8)
    ref[..., 1] //= 2  # a pinker reference
    norm = StainNormalizer("reinhard").fit_reference([ref])
    out = norm.slide_transform(img)(img)
    lab = rgb_to_lab(out.reshape(-1, 3))
    np.testing.assert_allclose(lab.mean(0), norm.reference["mean"], atol=1.0)
    np.testing.assert_allclose(lab.std(0), norm.reference["std"], rtol=0.05)
    state = norm.state()
    again = StainNormalizer.from_state(state).slide_transform(img)(img)
    np.testing.assert_array_equal(again, out)


def test_reinhard_without_reference_is_refused():
    with pytest.raises(ValueError, match="reference"):
        StainNormalizer("reinhard").slide_transform(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="macenko"):
        StainNormalizer("vahadane")


def test_macenko_refuses_a_blank_slide():
    with pytest.raises(ValueError, match="tissue pixels"):
        StainNormalizer("macenko").slide_transform(np.full((20, 20, 3), 250, np.uint8))


def test_stain_perturbation_is_seeded_and_grows_with_strength():
    px, _ = _synthetic_slide(HE_TRUE)
    img = np.clip(np.rint(px), 0, 255).astype(np.uint8).reshape(40, 100, 3)
    np.testing.assert_array_equal(perturb_slide_stain(img, "medium", 3), perturb_slide_stain(img, "medium", 3))
    assert not np.array_equal(perturb_slide_stain(img, "medium", 3), perturb_slide_stain(img, "medium", 4))
    assert np.abs(perturb_slide_stain(img, 0.0, 0).astype(int) - img).max() <= 1  # strength 0: identity
    change = [np.abs(perturb_slide_stain(img, s, 0).astype(float) - img).mean() for s in ("low", "medium", "high")]
    assert 0 < change[0] < change[1] < change[2]
    assert list(STAIN_STRENGTHS) == ["low", "medium", "high"]


def test_patch_stain_jitter_is_the_slide_perturbation_per_patch():
    """augment(stain_sigma=s) applies perturb_slide_stain's HED change, drawn per patch."""
    import torch

    from armodal.modalities.spatial.patches import stain_jitter
    from armodal.modalities.spatial.stain import _HED_FROM_RGB, _RGB_FROM_HED

    img = np.random.default_rng(0).integers(20, 250, (2, 6, 6, 3)).astype(np.uint8)
    x = torch.tensor(img).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(5)
    y = stain_jitter(x, 0.1, g)
    g.manual_seed(5)
    a = 1 + 0.1 * (2 * torch.rand(2, 3, generator=g) - 1)
    b = 0.1 * (2 * torch.rand(2, 3, generator=g) - 1)
    for i in range(2):
        od = -np.log(np.maximum(img[i].astype(float), 1) / 255)
        ref = np.exp(-(od @ (_HED_FROM_RGB @ np.diag(a[i].double().numpy()) @ _RGB_FROM_HED) + b[i].double().numpy() @ _RGB_FROM_HED))
        np.testing.assert_allclose(y[i].permute(1, 2, 0).numpy(), np.clip(ref, 0, 1), atol=1e-5)
    assert not torch.allclose(y[0] / x[0].clamp_min(1e-3), y[1] / x[1].clamp_min(1e-3))  # each patch its own change
    torch.testing.assert_close(stain_jitter(x, 0.0, g), x.clamp_min(1 / 255), atol=1e-6, rtol=0)
