"""The spatial sampler: K expression samples per spot of one section -> maps and an h5ad.

Two sources of a section: one of the configured her2st / Visium / h5ad sections (with its
counts: the maps show measured beside predicted), or a *new slide without counts*
(``image=`` + ``spots=<csv | grid>``, ``visium=``, ``h5ad=``; see
:mod:`armodal.modalities.spatial.newslide`), featurised by the encoder saved with the model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from armodal.generation import GenerationConfig
from armodal.modalities.base import Sampler, register_sampler
from armodal.modalities.spatial.data import SpatialDataModule
from armodal.modalities.spatial.io import SpatialDataError
from armodal.modalities.spatial.newslide import new_section
from armodal.modalities.spatial.patches import extract_patches
from armodal.modalities.spatial.predict import (
    interval_coverage,
    pearson_per_gene,
    check_settings,
    plot_maps,
    check_point,
    predict_expression,
    prediction_adata,
    sequence_layout,
)

__all__ = ["SpatialSampler", "predict_section", "section_features", "predict_new_slide", "plot_genes"]

SLIDE_INPUTS = ("image", "spots", "um_per_px", "spot_um", "visium", "h5ad")  # a new slide (see newslide.py)

_DM_CACHE: dict[str, SpatialDataModule] = {}


def _datamodule(data: Any, section: str | None) -> tuple[SpatialDataModule, str]:
    """A set-up datamodule whose sections include ``section`` (cached per process)."""
    if isinstance(data, SpatialDataModule):
        dm = data
    else:
        cfg = OmegaConf.create(data if not isinstance(data, DictConfig) else OmegaConf.to_container(data, resolve=True))
        if section is not None and section not in list(cfg.sections):
            cfg.sections = list(cfg.sections) + [section]  # a new section: featurised, never trained on
        key = OmegaConf.to_yaml(cfg)
        if key not in _DM_CACHE:
            _DM_CACHE[key] = instantiate(cfg)
        dm = _DM_CACHE[key]
    dm.setup("predict")
    section = section or dm.test_section or dm.section_names[-1]
    if section not in dm.expr:
        raise SpatialDataError(f"section {section!r} not available; sections: {dm.section_names}")
    return dm, section


def section_features(model, dm: SpatialDataModule, section: str, perturb: tuple | None = None):
    """Plain patch features [n, F] of a section through the encoder the model was trained with (saved next to
    its tokenizer); the datamodule's cached features when they come from that same encoder.  ``perturb``:
    ``(strength, seed)`` of a slide-level stain change applied before the encoder (never cached)."""
    enc = getattr(model.tokenizer, "encoder", None)
    same = enc is None or (enc.info.get("key") == dm.extractor.key
                           and enc.info.get("feature_key") == dm.extractor.cfg.feature_key())
    ext = dm.extractor if same else enc
    if getattr(model.conditioner, "pixels", False):  # end to end: the normalised patches themselves
        if perturb is None and same:
            return dm.feats[section][0]
        prepared = ext.prepare(dm.section_patches(section), dm.section_image(section), perturb)
        return torch.from_numpy(prepared).permute(0, 3, 1, 2).contiguous()
    if perturb is None and same:
        return dm.feats[section][0]
    names = list(dm.adatas[section].obs_names)
    return ext.features(section, lambda: dm.section_patches(section), names, image=lambda: dm.section_image(section),
                        perturb=perturb, cache=False)[0]


def predict_section(model, dm: SpatialDataModule, section: str, num_samples: int, config: GenerationConfig | None = None,
                    *, noise: bool = True, feats=None, with_info: bool = False, point: str = "rao_blackwell",
                    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
    """(samples [n_spots, K, G] with the quantiser residual, point prediction [n_spots, G] = mean of the
    K code samples decoded without it), sampled with the settings ``config``; checks the model's gene panel
    against the data.  ``feats``
    [n_spots, F] replaces the section's cached plain features (e.g. of a stain-perturbed image);
    ``with_info`` also returns :func:`~.predict.predict_expression`'s info (one clean generated map ...)."""
    tok = model.tokenizer
    if list(tok.genes) != list(dm.genes):
        raise SpatialDataError(f"the model's {len(tok.genes)}-gene panel differs from the data's {len(dm.genes)}-gene panel")
    layout = {"sequence": dm.sequence, "window_size": dm.window_size, "order": dm.order, "neighbours": dm.neighbours,
              "spot_key": dm.spot_key}
    feats = section_features(model, dm, section) if feats is None else feats
    noisy, mean, info = predict_expression(model, feats, np.asarray(dm.adatas[section].obsm["spatial"]), num_samples,
                                           layout, config, noise=noise, point=point)
    return (noisy, mean, info) if with_info else (noisy, mean)


@register_sampler("spatial")
class SpatialSampler(Sampler):
    """Expression maps for one section: K samples per spot -> mean, std, 90 % interval.

    Writes ``<section>_pred.h5ad`` (X = mean of K, layers std/q05/q95/measured) and
    ``<section>_maps.png`` (scanpy spatial maps: measured, predicted, uncertainty).
    ``num_samples`` is K (at least 2).  Inputs (``armodal-generate`` keys, else the constructor's
    values): ``section`` (default: the held-out one), or a new slide without counts: ``image`` with
    ``spots`` (a csv or ``grid``), ``um_per_px``, ``spot_um``; or ``visium`` / ``h5ad``
    (:mod:`~armodal.modalities.spatial.newslide`).  Settings: sampling ones only (:func:`~.predict.check_settings`).
    """

    inputs = ("section", *SLIDE_INPUTS)

    def __init__(self, data: Any, section: str | None = None, genes: list[str] | None = None, generation=None,
                 noise: bool = True, n_plot_genes: int = 4, image: str | None = None, spots: str | None = None,
                 um_per_px: float | None = None, spot_um: float | None = None, visium: str | None = None,
                 h5ad: str | None = None, point: str = "rao_blackwell") -> None:
        super().__init__(generation)
        self.data, self.section, self.genes = data, section, genes
        self.noise, self.n_plot_genes, self.point = noise, n_plot_genes, check_point(point, "sampler.point")
        self.slide = dict(zip(SLIDE_INPUTS, (image, spots, um_per_px, spot_um, visium, h5ad)))

    def __call__(self, model, num_samples: int, out_dir: str | Path, config: GenerationConfig | None = None,
                 **inputs: Any) -> dict:
        config = check_settings(self.settings(config, inputs))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        slide = {k: inputs.get(k, v) for k, v in self.slide.items()}
        if any(slide[k] is not None for k in ("image", "spots", "visium", "h5ad")):
            return predict_new_slide(model, out_dir, max(int(num_samples), 2), config, genes=self.genes,
                                     n_plot_genes=self.n_plot_genes, noise=self.noise, point=self.point, **slide)
        dm, section = _datamodule(self.data, inputs.get("section") or self.section)
        t0 = time.time()
        samples, mean = predict_section(model, dm, section, max(int(num_samples), 2), config, noise=self.noise,
                                        point=self.point)
        measured = dm.expr[section]
        pred = prediction_adata(dm.adatas[section], dm.genes, samples, measured, mean=mean)
        h5 = out_dir / f"{section}_pred.h5ad"
        pred.write_h5ad(h5)
        genes = self.genes or plot_genes(pred, self.n_plot_genes)
        png = plot_maps(pred, genes, out_dir / f"{section}_maps.png", title=f"{section}: K={samples.shape[1]} samples")
        r = pearson_per_gene(pred.X, measured)
        return {"section": section, "num_samples": int(samples.shape[1]), "h5ad": str(h5), "files": [str(h5)],
                "images": [str(png)],
                "pcc_mean": float(np.nanmean(r)), "coverage90": interval_coverage(samples, measured),
                "seconds": round(time.time() - t0, 1)}


def predict_new_slide(model, out_dir: str | Path, num_samples: int, config: GenerationConfig | None = None, *,
                      genes: list[str] | None = None, n_plot_genes: int = 4, noise: bool = True,
                      point: str = "rao_blackwell", image=None, spots=None, um_per_px=None, spot_um=None, visium=None, h5ad=None) -> dict:
    """Expression maps for a slide without counts: ``<name>_pred.h5ad`` (X = mean of K; layers std, q05,
    q95) and ``<name>_maps.png`` (predicted and std over the H&E), featurised by the model's saved encoder
    and sampled with the settings ``config`` (:func:`~.predict.check_settings`: refused ones are named)."""
    import warnings

    t0 = time.time()
    layout = sequence_layout(model.config.modality.data) if model.config is not None else sequence_layout({})
    config = check_settings(config, layout)  # before any slide is read
    section = new_section(image=image, spots=spots, um_per_px=um_per_px, spot_um=spot_um, visium=visium, h5ad=h5ad)
    name = str(section.obs["section"].iloc[0])
    enc = model.tokenizer.encoder
    if enc is None:
        raise SpatialDataError("this model was saved without its H&E encoder (tokenizer/encoder.json); "
                               "retrain it with this version to predict on new slides")
    c = enc.cfg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patches, kept = extract_patches(section, size=c.patch_size, unit=c.patch_unit, out_px=c.patch_px, outside=c.outside)
    for w in caught:
        warnings.warn(str(w.message), stacklevel=2)
    if not kept.all():
        section = section[kept].copy()
    hires = np.asarray(next(iter(section.uns["spatial"].values()))["images"]["hires"])
    if getattr(model.conditioner, "pixels", False):  # end to end: the conditioner reads the normalised patches
        feats = torch.from_numpy(enc.prepare(patches, hires)).permute(0, 3, 1, 2).contiguous()
    else:
        feats = enc.features(name, patches, list(section.obs_names), image=hires, cache=False)[0]
    noisy, mean, info = predict_expression(model, feats, np.asarray(section.obsm["spatial"]), num_samples, layout,
                                           config, noise=noise, point=point)
    pred = prediction_adata(section, list(model.tokenizer.genes), noisy, None, mean=mean)
    if "clean_sample" in info:  # one generated map (a sample's codes, no quantiser residual), beside the mean
        pred.layers["generated"] = np.asarray(info["clean_sample"], np.float32)
    out_dir = Path(out_dir)
    h5 = out_dir / f"{name}_pred.h5ad"
    pred.write_h5ad(h5)
    show = genes or plot_genes(pred, n_plot_genes)
    png = plot_maps(pred, show, out_dir / f"{name}_maps.png", title=f"{name}: K={num_samples} samples, no counts")
    return {"section": name, "n_spots": int(pred.n_obs), "num_samples": int(num_samples), "h5ad": str(h5),
            "images": [str(png)], "layout": layout, **{k: v for k, v in info.items() if not isinstance(v, np.ndarray)},
            "seconds": round(time.time() - t0, 1)}  # arrays go to the h5ad, not into the summary


def plot_genes(pred, n: int) -> list[str]:
    """Genes to show: the best-predicted ones among well-expressed genes; without counts, the genes whose
    predicted maps vary most across the spots."""
    mean = np.asarray(pred.layers["measured"]).mean(0) if "measured" in pred.layers else np.asarray(pred.X).mean(0)
    well = mean >= np.quantile(mean, 0.5)
    score = np.where(well, np.nan_to_num(pred.var["pcc"].to_numpy(), nan=-1), -2) if "pcc" in pred.var \
        else np.asarray(pred.X).std(0)
    return [pred.var_names[i] for i in np.argsort(score)[::-1][:n]]
