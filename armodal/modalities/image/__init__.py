"""Images: a VQ tokenizer (its own training stage) and class-conditional AR over its codes.

Stage 1 (``armodal-train experiment=image_fmnist_vq``): :class:`VQLitModule` trains a
small conv VQ-VAE (:class:`VQModel`; l2-normalised codebook or FSQ) on pixel batches
from :class:`ImageDataModule`.
Stage 2 (``armodal-train experiment=image_fmnist_ar``): :class:`ImageCodesDataModule`
pre-tokenizes the dataset once with the frozen VQ; the shared transformer learns the
raster-order codes after a class prefix from :class:`ClassConditioner`, with the 2D
cell index as its type stream.  :class:`ImageSampler` renders class-conditional
samples (CFG, temperature, top-k/p); :class:`ImageEvaluator` measures PSNR, codebook
usage, bits per token/image, classifier accuracy and Fréchet distance.

Modules: ``tokenizer``, ``data``, ``conditioner``, ``sampler``, ``evaluate`` (the skeleton every
modality shares) and the domain extras ``vq`` (the VQ-VAE network) and ``vq_module`` (its training
stage, ``save_vq`` / ``load_vq``).
"""

from armodal.modalities.image.conditioner import ClassConditioner
from armodal.modalities.image.data import (
    FASHION_MNIST_CLASSES,
    ImageCodesDataModule,
    ImageDataModule,
    ImageSet,
    load_fashion_mnist,
    load_image_folder,
    prepare_fashion_mnist,
)
from armodal.modalities.image.evaluate import ImageEvaluator, frechet_distance
from armodal.modalities.image.sampler import ImageSampler, sample_images, save_grid
from armodal.modalities.image.tokenizer import VQImageTokenizer
from armodal.modalities.image.vq import FSQuantizer, VectorQuantizer, VQConfig, VQModel
from armodal.modalities.image.vq_module import VQLitModule, load_vq, psnr, save_vq

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ClassConditioner",
    "FSQuantizer",
    "ImageCodesDataModule",
    "ImageDataModule",
    "ImageEvaluator",
    "ImageSampler",
    "ImageSet",
    "VQConfig",
    "VQImageTokenizer",
    "VQLitModule",
    "VQModel",
    "VectorQuantizer",
    "frechet_distance",
    "load_fashion_mnist",
    "load_image_folder",
    "load_vq",
    "prepare_fashion_mnist",
    "psnr",
    "sample_images",
    "save_grid",
    "save_vq",
]
