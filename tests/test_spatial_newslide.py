"""A new slide without counts: spots from a CSV, a grid over the tissue mask, a Visium folder, an
h5ad; each refusal (unknown scale, bad CSV, spots off the image) on its own."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from armodal.generation import GenerationConfig
from armodal.modalities.spatial.newslide import grid_spots, new_section, read_spots_csv, tissue_mask
from armodal.modalities.spatial import SpatialDataError


def _slide(tmp_path, w=400, h=300):
    """White background with a purple rectangle of 'tissue' at x 100..300, y 50..250."""
    img = np.full((h, w, 3), 245, np.uint8)
    img[50:250, 100:300] = (150, 90, 170)
    path = tmp_path / "slide.png"
    Image.fromarray(img).save(path)
    return path


def test_tissue_mask_finds_the_tissue(tmp_path):
    img = np.asarray(Image.open(_slide(tmp_path)))
    m = tissue_mask(img)
    assert m[60:240, 110:290].all() and not m[:40].any() and not m[:, :90].any()


def test_grid_over_the_tissue(tmp_path):
    path = _slide(tmp_path)
    a = new_section(image=path, spots="grid", spot_um=20, um_per_px=0.5)  # 40 px apart
    xy = a.obsm["spatial"]
    assert a.n_vars == 0 and len(xy) == 25  # grid x = 20 + 40 k on the tissue: 100..260; y = 20 + 40 k: 60..220
    assert (xy[:, 0] >= 100).all() and (xy[:, 0] < 300).all() and (xy[:, 1] >= 50).all() and (xy[:, 1] < 250).all()
    np.testing.assert_allclose(np.unique(np.diff(np.unique(xy[:, 0]))), [40.0])
    sf = a.uns["spatial"]["slide"]["scalefactors"]
    assert sf["microns_per_pixel"] == 0.5 and a.uns["spatial"]["slide"]["metadata"]["source_image_path"] == str(path)
    # the same grid from the mask function directly, at another mask scale
    m = np.zeros((30, 40), bool)
    m[5:25, 10:30] = True
    assert len(grid_spots(m, 0.1, 40.0)) == 25


def test_spots_from_csv_and_off_image_spots_dropped(tmp_path):
    path = _slide(tmp_path)
    pd.DataFrame({"id": ["a", "b", "c", "d"], "x": [150.0, 200.0, 450.0, -3.0], "y": [100.0, 120.0, 50.0, 10.0]}).to_csv(
        tmp_path / "spots.csv", index=False)
    with pytest.warns(UserWarning, match="2 of 4 spot\\(s\\) lie off the 400x300 px image.*dropped"):
        a = new_section(image=path, spots=tmp_path / "spots.csv", um_per_px=0.5)
    assert list(a.obs_names) == ["a", "b"]
    np.testing.assert_allclose(a.obsm["spatial"], [[150, 100], [200, 120]])
    from armodal.modalities.spatial.patches import extract_patches

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, kept = extract_patches(a, size=20, unit="um", out_px=8)  # 40 px patches inside the tissue
    assert p.shape == (2, 8, 8, 3) and kept.all() and (p[..., 0] < 200).all()


def test_unknown_scale_is_refused(tmp_path):
    path = _slide(tmp_path)
    pd.DataFrame({"x": [150.0], "y": [100.0]}).to_csv(tmp_path / "spots.csv", index=False)
    for kw in ({"spots": tmp_path / "spots.csv"}, {"spots": "grid", "spot_um": 100}):
        with pytest.raises(SpatialDataError, match="um_per_px=<value>"):
            new_section(image=path, **kw)
    with pytest.raises(SpatialDataError, match="spot_um"):
        new_section(image=path, spots="grid", um_per_px=0.5)
    with pytest.raises(SpatialDataError, match="positive"):
        new_section(image=path, spots="grid", spot_um=100, um_per_px=-1)


def test_bad_spots_csv_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("col1,col2\n1,2\n")
    with pytest.raises(SpatialDataError, match="spot-centre columns"):
        read_spots_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("x,y\n1,2\nfoo,3\n")
    with pytest.raises(SpatialDataError, match="1 row\\(s\\) with a missing or non-numeric x/y.*rows \\[3\\]"):
        read_spots_csv(tmp_path / "b.csv")
    with pytest.raises(SpatialDataError, match="not found"):
        read_spots_csv(tmp_path / "none.csv")
    with pytest.raises(SpatialDataError, match="image="):
        new_section(spots=tmp_path / "b.csv", um_per_px=1.0)
    with pytest.raises(SpatialDataError, match="exactly one"):
        new_section(image="x.png", um_per_px=1.0)


def test_visium_folder_without_counts(tmp_path):
    sdir = tmp_path / "V1" / "spatial"
    sdir.mkdir(parents=True)
    img = np.full((200, 200, 3), 240, np.uint8)
    Image.fromarray(img).save(sdir / "tissue_hires_image.png")
    (sdir / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 110.0}))
    rows = [["AAA-1", 1, 0, 0, 100, 120], ["AAC-1", 0, 0, 1, 100, 200], ["AAG-1", 1, 1, 0, 300, 150]]
    pd.DataFrame(rows).to_csv(sdir / "tissue_positions_list.csv", header=False, index=False)
    a = new_section(visium=tmp_path / "V1")
    assert list(a.obs_names) == ["AAA-1", "AAG-1"]  # in_tissue only
    np.testing.assert_allclose(a.obsm["spatial"], [[120, 100], [150, 300]])  # (col, row) = (x, y)
    assert a.uns["spatial"]["V1"]["scalefactors"]["microns_per_pixel"] == pytest.approx(0.5)  # 55 um / 110 px


def test_h5ad_without_counts(tmp_path):
    a = ad.AnnData(X=np.zeros((3, 0), np.float32))
    a.obs_names = ["s0", "s1", "s2"]
    a.obsm["spatial"] = np.array([[10.0, 10.0], [20.0, 10.0], [30.0, 10.0]])
    a.uns["spatial"] = {"lib": {"images": {"hires": np.full((40, 40, 3), 200, np.uint8)},
                                "scalefactors": {"tissue_hires_scalef": 1.0}}}
    a.write_h5ad(tmp_path / "x.h5ad")
    with pytest.raises(SpatialDataError, match="um_per_px"):
        new_section(h5ad=tmp_path / "x.h5ad")
    b = new_section(h5ad=tmp_path / "x.h5ad", um_per_px=2.0)
    assert b.n_obs == 3 and b.uns["spatial"]["lib"]["scalefactors"]["microns_per_pixel"] == 2.0


# ----------------------------------------------------------------------------- prediction on a new slide
def _tiny_model(tmp_path, sequence="window"):
    """An untrained model with everything a trained one carries: tokenizer + saved encoder + config."""
    import torch
    from omegaconf import OmegaConf

    from armodal.ar_model import ARModel
    from armodal.models import build_transformer
    from armodal.modalities.base import load_tokenizer
    from armodal.modalities.spatial import FeatureConfig, FeatureExtractor, RVQExpressionTokenizer, SpatialConditioner

    rng = np.random.default_rng(0)
    x = np.log1p(rng.poisson(2.0, (80, 6))).astype(np.float32)
    tok = RVQExpressionTokenizer.fit(x, [f"g{i}" for i in range(6)], n_levels=2, codebook_size=4,
                                     window_radius=3 if sequence == "window" else None, n_slots=3)
    tok.encoder = FeatureExtractor(FeatureConfig(backbone="resnet18", weights="random", patch_size=20.0, patch_px=16,
                                                 stain_norm="macenko"), None,
                                   reference_images=[np.asarray(Image.open(_slide(tmp_path)).convert("RGB"))])
    tok.save(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")  # the encoder comes back from the saved files
    torch.manual_seed(0)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, max_seq_len=128, d_model=32, n_layer=1, n_head=2)
    cond = SpatialConditioner(32, feat_dim=512, max_offset=8.0)
    cfg = OmegaConf.create({"modality": {"name": "spatial", "data": {"sequence": sequence, "window_size": 6,
                                                                    "order": "hilbert", "neighbours": 2}}})
    return ARModel(net.eval(), tok, cond.eval(), cfg)


@pytest.mark.parametrize("how", ["csv", "grid"])
def test_predict_new_slide_writes_h5ad_and_maps(tmp_path, how):
    from armodal.modalities.spatial.sampler import SpatialSampler

    model = _tiny_model(tmp_path)
    path = _slide(tmp_path)
    if how == "csv":
        xs, ys = np.meshgrid(np.arange(120, 290, 25.0), np.arange(70, 240, 25.0))
        pd.DataFrame({"x": xs.ravel(), "y": ys.ravel()}).to_csv(tmp_path / "spots.csv", index=False)
        kw = {"spots": str(tmp_path / "spots.csv")}
    else:
        kw = {"spots": "grid", "spot_um": 12.5}
    sampler = SpatialSampler(data=None, image=str(path), um_per_px=0.5, **kw)
    s = sampler(model, 4, tmp_path / "out", GenerationConfig(temperature=1.0, seed=3))
    pred = ad.read_h5ad(s["h5ad"])
    assert pred.n_obs == s["n_spots"] and pred.n_vars == 6
    assert pred.n_obs == (49 if how == "csv" else 64)  # 7 x 7 listed spots; a 25-px grid over the 200x200-px tissue
    assert {"std", "q05", "q95", "generated"} <= set(pred.layers) and "measured" not in pred.layers
    json.dumps(s)  # the summary (written to summary.json) holds no arrays
    assert (pred.layers["q05"] <= pred.layers["q95"] + 1e-6).all() and (pred.layers["std"] >= 0).all()
    assert np.isfinite(pred.X).all() and s["n_windows"] > 1 and s["layout"]["order"] == "hilbert"
    assert (tmp_path / "out" / "slide_maps.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="cfg_scale.*not supported by modality 'spatial'"):
        sampler(model, 4, tmp_path / "out2", GenerationConfig(cfg_scale=2.0))


def test_new_slide_refusals_through_the_sampler(tmp_path):
    from armodal.modalities.spatial.sampler import SpatialSampler

    model = _tiny_model(tmp_path, sequence="spot")
    with pytest.raises(SpatialDataError, match="um_per_px=<value>"):
        SpatialSampler(data=None, image=str(_slide(tmp_path)), spots="grid", spot_um=12.5)(model, 2, tmp_path / "o")
    model.tokenizer.encoder = None
    model.tokenizer._encoder_dir = None
    with pytest.raises(SpatialDataError, match="without its H&E encoder"):
        SpatialSampler(data=None, image=str(_slide(tmp_path)), spots="grid", spot_um=12.5, um_per_px=0.5)(model, 2, tmp_path / "o")
