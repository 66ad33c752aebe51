"""Spatial gene expression from H&E, TARIO-style.

A neighbourhood of spots' H&E patch features is a continuous prefix (with 2D spot
offsets); the shared causal transformer then generates the spots' expression tokens
(residual-VQ codes of each spot's log-expression vector, or per-gene bins).  Sampling
K times gives each spot's prediction (mean) and uncertainty (std, 90 % interval).

Readers follow scanpy's conventions: ``obsm['spatial']`` in full-resolution image
pixels, the image and scale factors under ``uns['spatial'][library_id]``.

Modules: ``tokenizer``, ``data``, ``conditioner``, ``sampler``, ``evaluate`` (the skeleton every
modality shares) and the domain extras ``io`` (section readers, panels), ``patches`` (H&E patches,
stain augmentation), ``stain`` (slide-level stain normalisation and perturbation), ``features`` (patch
encoders, SimCLR), ``geometry`` (spatial orders, windows, Moran's I), ``window`` (window sequences),
``newslide`` (a slide without counts) and ``predict`` (section sampling, metrics, baseline, plots).
"""

from armodal.modalities.spatial.conditioner import SpatialConditioner
from armodal.modalities.spatial.data import SpatialDataModule, neighbourhoods
from armodal.modalities.spatial.evaluate import SpatialEvaluator
from armodal.modalities.spatial.features import FeatureConfig, FeatureExtractor, build_backbone, train_simclr
from armodal.modalities.spatial.io import (
    SpatialDataError,
    apply_panel,
    load_image,
    load_panel,
    normalize_log1p,
    read_h5ad_section,
    read_her2st,
    read_section,
    read_visium,
    select_hvg_panel,
)
from armodal.modalities.spatial.patches import augment, extract_patches, hed_to_rgb, patch_boxes, rgb_to_hed
from armodal.modalities.spatial.predict import (
    HISTOGENE_PCC,
    HISTOGENE_RECIPE,
    REG2ST_PCC,
    interval_coverage,
    pearson_per_gene,
    plot_maps,
    prediction_adata,
    ridge_baseline,
    sample_section,
)
from armodal.modalities.spatial.geometry import cover, morans_i, spatial_order
from armodal.modalities.spatial.newslide import new_section
from armodal.modalities.spatial.predict import predict_expression
from armodal.modalities.spatial.sampler import SpatialSampler, predict_section
from armodal.modalities.spatial.stain import StainNormalizer, perturb_slide_stain
from armodal.modalities.spatial.tokenizer import BinnedExpressionTokenizer, ExpressionTokenizer, RVQExpressionTokenizer

__all__ = [
    "BinnedExpressionTokenizer", "ExpressionTokenizer", "FeatureConfig", "FeatureExtractor", "HISTOGENE_PCC",
    "HISTOGENE_RECIPE", "REG2ST_PCC", "StainNormalizer", "cover", "morans_i", "new_section", "perturb_slide_stain",
    "predict_expression", "spatial_order",
    "RVQExpressionTokenizer", "SpatialConditioner", "SpatialDataError", "SpatialDataModule", "SpatialEvaluator",
    "SpatialSampler", "apply_panel", "augment", "build_backbone", "extract_patches", "hed_to_rgb",
    "interval_coverage", "load_image", "load_panel", "neighbourhoods", "normalize_log1p", "patch_boxes",
    "pearson_per_gene", "plot_maps", "predict_section", "prediction_adata", "read_h5ad_section", "read_her2st",
    "read_section", "read_visium", "rgb_to_hed", "ridge_baseline", "sample_section", "select_hvg_panel",
    "train_simclr",
]
