"""``armodal-generate`` / ``armodal-eval`` entry points for the spatial modality."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import scanpy as sc
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from armodal.modalities.base import Sampler
from armodal.modalities.spatial._data import SpatialDataModule
from armodal.modalities.spatial._io import SpatialDataError
from armodal.modalities.spatial._predict import (
    HISTOGENE_PCC,
    interval_coverage,
    pearson_per_gene,
    plot_maps,
    prediction_adata,
    ridge_baseline,
    sample_section,
    summarise,
    write_json,
)

__all__ = ["SpatialSampler", "SpatialEvaluator", "predict_section"]

log = logging.getLogger(__name__)

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


def predict_section(model, dm: SpatialDataModule, section: str, num_samples: int, **sampling) -> tuple[np.ndarray, np.ndarray]:
    """(samples [n_spots, K, G] with the quantiser residual, point prediction [n_spots, G] = mean of the
    K code samples decoded without it); checks the model's gene panel against the data."""
    tok = model.tokenizer
    if list(tok.genes) != list(dm.genes):
        raise SpatialDataError(f"the model's {len(tok.genes)}-gene panel differs from the data's {len(dm.genes)}-gene panel")
    noisy, clean = sample_section(model.net, model.conditioner, tok, dm.section_cond(section), num_samples,
                                  return_clean=True, **sampling)
    return noisy, clean.mean(1)


def _train_hvg_index(dm: SpatialDataModule, n: int = 50) -> np.ndarray:
    """Top-n most variable panel genes, ranked on the *training* sections (scanpy seurat dispersion)."""
    import anndata as ad

    cat = ad.concat([dm.adatas[s] for s in dm.train_sections], join="inner")
    sc.pp.highly_variable_genes(cat, n_top_genes=min(n, cat.n_vars), flavor="seurat")
    order = cat.var["dispersions_norm"].fillna(-np.inf).to_numpy().argsort()[::-1][:n]
    return np.sort(order)


class SpatialSampler(Sampler):
    """Expression maps for one section: K samples per spot -> mean, std, 90 % interval.

    Writes ``<section>_pred.h5ad`` (X = mean of K, layers std/q05/q95/measured) and
    ``<section>_maps.png`` (scanpy spatial maps: measured, predicted, uncertainty).
    """

    def __init__(self, data: Any, section: str | None = None, genes: list[str] | None = None,
                 temperature: float = 1.0, noise: bool = True, n_plot_genes: int = 4) -> None:
        self.data, self.section, self.genes = data, section, genes
        self.temperature, self.noise, self.n_plot_genes = temperature, noise, n_plot_genes

    def __call__(self, model, num_samples: int, out_dir: str | Path, **overrides: Any) -> dict:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        section = overrides.pop("section", None) or self.section
        dm, section = _datamodule(self.data, section)
        kw = {"temperature": float(overrides.get("temperature", self.temperature)),
              "top_k": int(overrides.get("top_k", 0) or 0), "top_p": float(overrides.get("top_p", 1.0) or 1.0),
              "seed": int(overrides.get("seed", 0) or 0), "noise": self.noise}
        t0 = time.time()
        samples, mean = predict_section(model, dm, section, max(int(num_samples), 2), **kw)
        measured = dm.expr[section]
        pred = prediction_adata(dm.adatas[section], dm.genes, samples, measured, mean=mean)
        h5 = out_dir / f"{section}_pred.h5ad"
        pred.write_h5ad(h5)
        genes = self.genes or _plot_genes(pred, self.n_plot_genes)
        png = plot_maps(pred, genes, out_dir / f"{section}_maps.png", title=f"{section}: K={samples.shape[1]} samples")
        r = pearson_per_gene(pred.X, measured)
        return {"section": section, "num_samples": int(samples.shape[1]), "h5ad": str(h5), "images": [str(png)],
                "pcc_mean": float(np.nanmean(r)), "coverage90": interval_coverage(samples, measured),
                "seconds": round(time.time() - t0, 1)}


def _plot_genes(pred, n: int) -> list[str]:
    """Genes to show: the best-predicted ones among well-expressed genes (or the most expressed)."""
    mean = np.asarray(pred.layers["measured"]).mean(0) if "measured" in pred.layers else np.asarray(pred.X).mean(0)
    well = mean >= np.quantile(mean, 0.5)
    score = np.where(well, np.nan_to_num(pred.var["pcc"].to_numpy(), nan=-1), -2) if "pcc" in pred.var else mean
    return [pred.var_names[i] for i in np.argsort(score)[::-1][:n]]


class SpatialEvaluator:
    """``armodal-eval``: held-out section metrics for the AR model and the ST-Net-style baseline.

    Per held-out section: Pearson r per gene across spots (mean, median over the panel,
    mean over the top-50 training-HVGs), 90 % predictive-interval coverage, the ridge
    regression baseline on the same cached features (view 0 plus augmented views of the
    training spots), and HisToGene's published number for that fold.
    """

    def __init__(self, temperature: float = 1.0, noise: bool = True, write_outputs: bool = True,
                 n_plot_genes: int = 4, seed: int = 0) -> None:
        self.temperature, self.noise, self.write_outputs = temperature, noise, write_outputs
        self.n_plot_genes, self.seed = n_plot_genes, seed

    def __call__(self, model, datamodule: SpatialDataModule, out_dir: str | Path, num_samples: int = 64, **kw) -> dict:
        dm = datamodule
        dm.setup("test")
        s = dm.test_section
        if s is None:
            raise SpatialDataError("spatial evaluation needs data.test_section=<held-out section>")
        t0 = time.time()
        samples, mean = predict_section(model, dm, s, num_samples, temperature=self.temperature, noise=self.noise, seed=self.seed)
        y = dm.expr[s]
        hvg = _train_hvg_index(dm)
        out: dict = {"test_section": s, "num_samples": int(num_samples), "n_genes": len(dm.genes),
                     "n_spots": int(len(y)), "features": dm.extractor.info | {"ssl_loss": None}}
        out.update(summarise(mean, y, hvg, prefix="ar_"))
        out["ar_pcc_mean_of_noisy_samples"] = float(np.nanmean(pearson_per_gene(samples.mean(1), y)))
        out["ar_coverage90"] = interval_coverage(samples, y, 0.9)
        out["ar_coverage50"] = interval_coverage(samples, y, 0.5)
        out["ar_seconds"] = round(time.time() - t0, 1)
        # baseline: same features, direct regression
        xs, ys, gs = [], [], []
        for t in dm.train_sections:
            f = dm.feats[t].numpy()  # [V, n, F]
            xs.append(f.reshape(-1, f.shape[-1]))
            ys.append(np.tile(dm.expr[t], (f.shape[0], 1)))
            gs.append(np.full(f.shape[0] * f.shape[1], t))
        base, info = ridge_baseline(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), dm.feats[s][0].numpy())
        out.update(summarise(base, y, hvg, prefix="ridge_"))
        out["ridge"] = info
        out["histogene_pcc_mean"] = HISTOGENE_PCC.get(s)
        if self.write_outputs:
            od = Path(out_dir) / f"spatial_{s}"
            od.mkdir(parents=True, exist_ok=True)
            pred = prediction_adata(dm.adatas[s], dm.genes, samples, y, mean=mean)
            pred.layers["ridge"] = base.astype(np.float32)
            pred.write_h5ad(od / f"{s}_pred.h5ad")
            genes = _plot_genes(pred, self.n_plot_genes)
            png = plot_maps(pred, genes, od / f"{s}_maps.png", title=f"held-out {s}: AR mean of K={num_samples}")
            out["images"] = [str(png)]
            out["h5ad"] = str(od / f"{s}_pred.h5ad")
            write_json(out, od / "metrics.json")
        log.info("spatial eval %s: AR pcc %.3f ridge %.3f cov90 %.3f", s, out["ar_pcc_mean"], out["ridge_pcc_mean"], out["ar_coverage90"])
        return out
