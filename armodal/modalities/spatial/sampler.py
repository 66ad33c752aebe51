"""The spatial sampler: K expression samples per spot of one section -> maps and an h5ad."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from armodal.generation import GenerationConfig
from armodal.modalities.base import Sampler, register_sampler
from armodal.modalities.spatial.data import SpatialDataModule
from armodal.modalities.spatial.io import SpatialDataError
from armodal.modalities.spatial.predict import (
    interval_coverage,
    pearson_per_gene,
    plot_maps,
    prediction_adata,
    sample_section,
)

__all__ = ["SpatialSampler", "predict_section", "plot_genes"]

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


def predict_section(model, dm: SpatialDataModule, section: str, num_samples: int,
                    config: GenerationConfig | None = None, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(samples [n_spots, K, G] with the quantiser residual, point prediction [n_spots, G] = mean of the
    K code samples decoded without it); checks the model's gene panel against the data."""
    tok = model.tokenizer
    if list(tok.genes) != list(dm.genes):
        raise SpatialDataError(f"the model's {len(tok.genes)}-gene panel differs from the data's {len(dm.genes)}-gene panel")
    noisy, clean = sample_section(model, dm.section_cond(section), num_samples, config, noise=noise, return_clean=True)
    return noisy, clean.mean(1)


@register_sampler("spatial")
class SpatialSampler(Sampler):
    """Expression maps for one section: K samples per spot -> mean, std, 90 % interval.

    Writes ``<section>_pred.h5ad`` (X = mean of K, layers std/q05/q95/measured) and
    ``<section>_maps.png`` (scanpy spatial maps: measured, predicted, uncertainty).
    ``num_samples`` is K (at least 2).  Input: ``section`` (default: the held-out one).
    """

    inputs = ("section",)

    def __init__(self, data: Any, section: str | None = None, genes: list[str] | None = None, generation=None,
                 noise: bool = True, n_plot_genes: int = 4) -> None:
        super().__init__(generation)
        self.data, self.section, self.genes = data, section, genes
        self.noise, self.n_plot_genes = noise, n_plot_genes

    def __call__(self, model, num_samples: int, out_dir: str | Path, config: GenerationConfig | None = None,
                 **inputs: Any) -> dict:
        config = self.settings(config, inputs)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        dm, section = _datamodule(self.data, inputs.get("section") or self.section)
        t0 = time.time()
        samples, mean = predict_section(model, dm, section, max(int(num_samples), 2), config, self.noise)
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


def plot_genes(pred, n: int) -> list[str]:
    """Genes to show: the best-predicted ones among well-expressed genes (or the most expressed)."""
    mean = np.asarray(pred.layers["measured"]).mean(0) if "measured" in pred.layers else np.asarray(pred.X).mean(0)
    well = mean >= np.quantile(mean, 0.5)
    score = np.where(well, np.nan_to_num(pred.var["pcc"].to_numpy(), nan=-1), -2) if "pcc" in pred.var else mean
    return [pred.var_names[i] for i in np.argsort(score)[::-1][:n]]
