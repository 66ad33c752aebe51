"""Contract kit for the image modality (the VQ stage and the AR stage over its codes)."""

from __future__ import annotations

import numpy as np
import torch

from armodal.modalities.image import ImageCodesDataModule, ImageDataModule, VQConfig, VQImageTokenizer, VQModel, save_vq
from tests.test_image_e2e import _fixture

MODALITY = "image"
EXPERIMENTS = ("image_fmnist_vq", "image_fmnist_ar")
_VQ = {"channels": [8, 16, 16], "codebook_size": 32, "code_dim": 4}


def _vq() -> VQModel:
    torch.manual_seed(0)
    return VQModel(VQConfig(**_VQ)).eval()


def _folder(tmp):
    root = tmp / "imgs"
    if not root.exists():
        _fixture(root)
    return root


def tokenizers(tmp):
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)) for _ in range(2)]
    return {"image.vq": (VQImageTokenizer(_vq(), (28, 28), ["a", "b", "c"]), images)}


def same(a, b):
    """A VQ keeps the image's shape and pixel type (its reconstruction is lossy, by design)."""
    return a.shape == b.shape and a.dtype == b.dtype


def datamodules(tmp):
    kw = dict(source="folder", root=str(_folder(tmp)), cache_dir=str(tmp / "cache"), val_size=6,
              test_fraction=0.25, batch_size=8)
    return {"image.pixels": ImageDataModule(**kw),
            "image.codes": ImageCodesDataModule(vq_ckpt=str(save_vq(_vq(), tmp / "vq")), **kw)}


def experiments(tmp):
    data = [f"modality.data.root={_folder(tmp)}", "modality.data.source=folder", "modality.data.val_size=6",
            "modality.data.test_fraction=0.25", "modality.data.batch_size=8", "++modality.evaluator.clf_epochs=1"]
    return {
        "image_fmnist_vq": [*data, *(f"module.vq.{k}={v}".replace(" ", "") for k, v in _VQ.items())],
        "image_fmnist_ar": [*data, f"modality.data.vq_ckpt={save_vq(_vq(), tmp / 'vq')}", "model.d_model=32",
                            "model.n_layer=1", "model.n_head=2", "modality.conditioner.num_classes=3",
                            "++modality.evaluator.num_fid_samples=6", "++modality.evaluator.batch_size=8"],
    }
