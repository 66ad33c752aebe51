"""The spatial evaluator (``armodal-eval``): held-out section metrics for the AR model and a baseline."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import scanpy as sc

from armodal.generation import GenerationConfig
from armodal.modalities.base import register_evaluator
from armodal.modalities.spatial.data import SpatialDataModule
from armodal.modalities.spatial.io import SpatialDataError
from armodal.modalities.spatial.predict import (
    HISTOGENE_PCC,
    interval_coverage,
    pearson_per_gene,
    plot_maps,
    prediction_adata,
    ridge_baseline,
    summarise,
    write_json,
)
from armodal.modalities.spatial.sampler import plot_genes, predict_section

__all__ = ["SpatialEvaluator"]

log = logging.getLogger(__name__)


def _train_hvg_index(dm: SpatialDataModule, n: int = 50) -> np.ndarray:
    """Top-n most variable panel genes, ranked on the *training* sections (scanpy seurat dispersion)."""
    import anndata as ad

    cat = ad.concat([dm.adatas[s] for s in dm.train_sections], join="inner")
    sc.pp.highly_variable_genes(cat, n_top_genes=min(n, cat.n_vars), flavor="seurat")
    order = cat.var["dispersions_norm"].fillna(-np.inf).to_numpy().argsort()[::-1][:n]
    return np.sort(order)


@register_evaluator("spatial")
class SpatialEvaluator:
    """``armodal-eval``: held-out section metrics for the AR model and the ST-Net-style baseline.

    Per held-out section: Pearson r per gene across spots (mean, median over the panel,
    mean over the top-50 training-HVGs), 90 % predictive-interval coverage, the ridge
    regression baseline on the same cached features (view 0 plus augmented views of the
    training spots), and HisToGene's published number for that fold.
    """

    def __init__(self, generation=None, noise: bool = True, write_outputs: bool = True, n_plot_genes: int = 4) -> None:
        self.generation = GenerationConfig.from_dict(generation or {"seed": 0}, source="SpatialEvaluator generation")
        self.noise, self.write_outputs, self.n_plot_genes = noise, write_outputs, n_plot_genes

    def __call__(self, model, datamodule: SpatialDataModule, out_dir: str | Path, num_samples: int = 64,
                 config: GenerationConfig | None = None, **kw) -> dict:
        dm = datamodule
        dm.setup("test")
        s = dm.test_section
        if s is None:
            raise SpatialDataError("spatial evaluation needs data.test_section=<held-out section>")
        t0 = time.time()
        samples, mean = predict_section(model, dm, s, num_samples, config or self.generation, self.noise)
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
            genes = plot_genes(pred, self.n_plot_genes)
            png = plot_maps(pred, genes, od / f"{s}_maps.png", title=f"held-out {s}: AR mean of K={num_samples}")
            out["images"] = [str(png)]
            out["h5ad"] = str(od / f"{s}_pred.h5ad")
            write_json(out, od / "metrics.json")
        log.info("spatial eval %s: AR pcc %.3f ridge %.3f cov90 %.3f", s, out["ar_pcc_mean"], out["ridge_pcc_mean"], out["ar_coverage90"])
        return out
