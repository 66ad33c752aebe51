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
from armodal.modalities.spatial.geometry import morans_i, neighbour_graph
from armodal.modalities.spatial.io import SpatialDataError
from armodal.modalities.spatial.predict import (
    HISTOGENE_PCC,
    POINT_ESTIMATES,
    REG2ST_PCC,
    check_point,
    check_settings,
    interval_coverage,
    pearson_per_gene,
    plot_maps,
    prediction_adata,
    ridge_baseline,
    summarise,
    write_json,
)
from armodal.modalities.spatial.sampler import plot_genes, predict_section, section_features

__all__ = ["SpatialEvaluator", "moran_summary"]

log = logging.getLogger(__name__)


def _train_hvg_index(dm: SpatialDataModule, n: int = 50) -> np.ndarray:
    """Top-n most variable panel genes, ranked on the *training* sections (scanpy seurat dispersion)."""
    import anndata as ad

    cat = ad.concat([dm.adatas[s] for s in dm.train_sections], join="inner")
    sc.pp.highly_variable_genes(cat, n_top_genes=min(n, cat.n_vars), flavor="seurat")
    order = cat.var["dispersions_norm"].fillna(-np.inf).to_numpy().argsort()[::-1][:n]
    return np.sort(order)


def moran_summary(maps: dict[str, np.ndarray], measured: np.ndarray, xy: np.ndarray, radius: float = 1.5,
                  min_measured: float = 0.1) -> dict:
    """Moran's I of every gene map (spots within ``radius`` spacings are neighbours): the median over the
    genes whose *measured* map has I >= ``min_measured`` of I(map) / I(measured), per map."""
    w = neighbour_graph(xy, radius)
    i_meas = morans_i(measured, w)
    ok = np.isfinite(i_meas) & (i_meas >= min_measured)
    out = {"moran_genes": int(ok.sum()), "moran_measured_median": float(np.nanmedian(i_meas[ok])) if ok.any() else float("nan")}
    for name, m in maps.items():
        i = morans_i(m, w)
        out[f"{name}_moran_median"] = float(np.nanmedian(i[ok])) if ok.any() else float("nan")
        out[f"{name}_moran_ratio"] = float(np.nanmedian(i[ok] / i_meas[ok])) if ok.any() else float("nan")
    return out


@register_evaluator("spatial")
class SpatialEvaluator:
    """``armodal-eval``: held-out section metrics for the AR model and the ST-Net-style baseline.

    Per held-out section: Pearson r per gene across spots (mean, median over the panel,
    mean over the top-50 training-HVGs), 90 % predictive-interval coverage, the ridge
    regression baseline on the same cached features (view 0 plus augmented views of the
    training spots), Moran's I of the predicted maps against the measured ones
    (:func:`moran_summary`; ``ar`` = the point prediction (mean of K), ``ar_generated`` = one generated
    map (a sample's codes decoded without the quantiser residual), ``ar_sample`` = that sample with
    the residual, ``ridge``), and the stain-robustness check: the held-out image's stains perturbed in HED
    space at each named strength of ``robustness`` (seed ``robustness_seed``), features
    recomputed through the same encoder, and the relative PCC drop ``1 - PCC(perturbed) / PCC``
    (same K and sampling seed).  For reference: HisToGene's public code run on these folds and
    Reg2ST's published 31-section numbers.
    """

    def __init__(self, generation=None, noise: bool = True, write_outputs: bool = True, n_plot_genes: int = 4,
                 robustness: list[str] | tuple[str, ...] = ("low", "medium", "high"), robustness_seed: int = 0,
                 point: str = "rao_blackwell") -> None:
        from armodal.modalities.spatial.stain import STAIN_STRENGTHS  # noqa: PLC0415

        self.point = check_point(point, "evaluator.point")
        self.generation = GenerationConfig.from_dict(generation or {"seed": 0}, source="SpatialEvaluator generation")
        self.noise, self.write_outputs, self.n_plot_genes = noise, write_outputs, n_plot_genes
        bad = [r for r in (robustness or []) if r not in STAIN_STRENGTHS]
        if bad:
            raise ValueError(f"evaluator.robustness: unknown strength(s) {bad}; known: {list(STAIN_STRENGTHS)}")
        self.robustness, self.robustness_seed = list(robustness or []), int(robustness_seed)

    def __call__(self, model, datamodule: SpatialDataModule, out_dir: str | Path, num_samples: int = 64,
                 config: GenerationConfig | None = None, **kw) -> dict:
        config = check_settings(config or self.generation)  # a refused setting fails before any work
        dm = datamodule
        dm.setup("test")
        s = dm.test_section
        if s is None:
            raise SpatialDataError("spatial evaluation needs data.test_section=<held-out section>")
        t0 = time.time()
        samples, mean, pinfo = predict_section(model, dm, s, num_samples, config, noise=self.noise, with_info=True,
                                               point=self.point)
        y = dm.expr[s]
        hvg = _train_hvg_index(dm)
        out: dict = {"test_section": s, "num_samples": int(num_samples), "n_genes": len(dm.genes),
                     "n_spots": int(len(y)), "features": dm.extractor.info | {"ssl_loss": None}}
        out.update(summarise(mean, y, hvg, prefix="ar_"))
        out["ar_point"] = self.point
        for name in POINT_ESTIMATES:  # both point predictions of the same draws, side by side
            out[f"ar_pcc_mean_{name}"] = float(np.nanmean(pearson_per_gene(pinfo[f"point_{name}"], y)))
        out["ar_pcc_mean_of_noisy_samples"] = float(np.nanmean(pearson_per_gene(samples.mean(1), y)))
        out["ar_coverage90"] = interval_coverage(samples, y, 0.9)
        out["ar_coverage50"] = interval_coverage(samples, y, 0.5)
        out["ar_seconds"] = round(time.time() - t0, 1)
        # baseline: same features, direct regression
        xs, ys, gs = [], [], []
        for t in dm.train_sections:
            f = dm.enc_feats[t].numpy()  # [V, n, F] encoder features
            xs.append(f.reshape(-1, f.shape[-1]))
            ys.append(np.tile(dm.expr[t], (f.shape[0], 1)))
            gs.append(np.full(f.shape[0] * f.shape[1], t))
        base, info = ridge_baseline(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), dm.enc_feats[s][0].numpy())
        out.update(summarise(base, y, hvg, prefix="ridge_"))
        out["ridge"] = info
        xy = np.asarray(dm.adatas[s].obsm["spatial"])
        out.update(moran_summary({"ar": mean, "ar_generated": pinfo["clean_sample"], "ar_sample": samples[:, 0],
                                  "ridge": base}, y, xy))
        for strength in self.robustness:
            t1 = time.time()
            pert = (strength, self.robustness_seed)
            fp = section_features(model, dm, s, perturb=pert)
            _, mean_p = predict_section(model, dm, s, num_samples, config, noise=self.noise, feats=fp, point=self.point)
            pcc_p = float(np.nanmean(pearson_per_gene(mean_p, y)))
            fr = fp if fp.dim() == 2 else dm.extractor.features(s, lambda: dm.section_patches(s), list(dm.adatas[s].obs_names),
                                                                  image=lambda: dm.section_image(s), perturb=pert, cache=False)[0]
            base_p, _ = ridge_baseline(np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), fr.numpy(),
                                       alphas=(info["alpha"],))
            ridge_p = float(np.nanmean(pearson_per_gene(base_p, y)))
            out[f"ar_pcc_stain_{strength}"] = pcc_p
            out[f"ar_stain_drop_{strength}"] = 1.0 - pcc_p / out["ar_pcc_mean"]
            out[f"ridge_pcc_stain_{strength}"] = ridge_p
            out[f"ridge_stain_drop_{strength}"] = 1.0 - ridge_p / out["ridge_pcc_mean"]
            log.info("stain %s: AR pcc %.3f (drop %.1f %%), ridge %.3f (%.0fs)", strength, pcc_p,
                     100 * out[f"ar_stain_drop_{strength}"], ridge_p, time.time() - t1)
        if self.robustness:
            out["robustness_seed"] = self.robustness_seed
        out["sequence"] = {"sequence": dm.sequence, "order": dm.order, "window_size": dm.window_size, "spot_key": dm.spot_key}
        out["histogene_pcc_mean"] = HISTOGENE_PCC.get(s)  # HisToGene's public code run on these folds (see predict.py)
        out["reg2st_pcc_mean"] = REG2ST_PCC.get(s)  # published, trained on 31 sections
        if self.write_outputs:
            od = Path(out_dir) / f"spatial_{s}"
            od.mkdir(parents=True, exist_ok=True)
            pred = prediction_adata(dm.adatas[s], dm.genes, samples, y, mean=mean)
            pred.layers["ridge"] = base.astype(np.float32)
            pred.layers["generated"] = pinfo["clean_sample"].astype(np.float32)  # one sample (codes only): a generated map
            pred.write_h5ad(od / f"{s}_pred.h5ad")
            genes = plot_genes(pred, self.n_plot_genes)
            png = plot_maps(pred, genes, od / f"{s}_maps.png", title=f"held-out {s}: AR mean of K={num_samples}")
            out["images"] = [str(png)]
            out["h5ad"] = str(od / f"{s}_pred.h5ad")
            write_json(out, od / "metrics.json")
        log.info("spatial eval %s: AR pcc %.3f ridge %.3f cov90 %.3f", s, out["ar_pcc_mean"], out["ridge_pcc_mean"], out["ar_coverage90"])
        return out
