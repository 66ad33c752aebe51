"""End to end: both image stages through the real configs (composed and shrunk), then load,
sample and evaluate, on a generated class-folder fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def _fixture(root: Path, classes: int = 3, per_class: int = 12) -> None:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 30, (28, 28)).astype(np.uint8)
            arr[4 + 6 * c: 10 + 6 * c, 4:24] = 220  # a horizontal bar whose height codes the class
            Image.fromarray(arr, "L").save(d / f"{i:02d}.png")


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from armodal.utils.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_image_two_stages_end_to_end(tmp_path, monkeypatch):
    from armodal.api import load
    from armodal.ar_model import ARModel
    from armodal.eval import evaluate
    from armodal.modalities.image import ImageDataModule, VQImageTokenizer, sample_images
    from armodal.train import train

    monkeypatch.setenv("ARMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ARMODAL_RUNS", str(tmp_path / "runs"))
    _fixture(tmp_path / "imgs")
    data = [
        "modality.data.source=folder", f"modality.data.root={tmp_path / 'imgs'}", "modality.data.val_size=6",
        "modality.data.test_fraction=0.25", "modality.data.batch_size=8", "logger=csv",
        "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
    ]
    vq_dir = tmp_path / "runs" / "image_fmnist_vq"
    train(_compose("train", ["experiment=image_fmnist_vq", *data, "module.vq.channels=[8,16,16]",
                             "module.vq.codebook_size=32", "module.vq.code_dim=4"]))
    assert (vq_dir / "checkpoints" / "last.ckpt").is_file() and (vq_dir / "vq.safetensors").is_file()

    # stage 2 finds stage 1 through the config's default vq_ckpt (runs/image_fmnist_vq/checkpoints/last.ckpt)
    ar_dir = tmp_path / "ar"
    train(_compose("train", ["experiment=image_fmnist_ar", *data, f"run_dir={ar_dir}", "model.d_model=32",
                             "model.n_layer=2", "model.n_head=2", "modality.conditioner.num_classes=3",
                             "callbacks.samples.num_samples=1"]))
    assert list((tmp_path / "cache" / "image_codes").glob("*.pt")), "code grids were not cached"
    assert (ar_dir / "tokenizer" / "vq.safetensors").is_file()  # the AR run is self-contained
    grids = sorted(ar_dir.glob("samples/*/grid.png"))
    assert grids, "the training callback wrote no sample grid"
    assert Image.open(grids[-1]).size[1] > Image.open(grids[-1]).size[0]  # 3 class rows x 1 sample column
    assert len(list(grids[-1].parent.glob("images/*.png"))) == 3

    model = load(ar_dir / "checkpoints" / "last.ckpt")
    assert isinstance(model, ARModel) and isinstance(model.tokenizer, VQImageTokenizer)
    imgs = sample_images(model, torch.tensor([0, 1, 2]), cfg_scale=2.0)
    assert imgs.shape == (3, 1, 28, 28) and imgs.dtype == torch.uint8

    out = tmp_path / "eval.json"
    m = evaluate(_compose("eval", [f"ckpt={ar_dir / 'checkpoints' / 'last.ckpt'}", f"out={out}",
                                   "++evaluator.num_fid_samples=30", "++evaluator.clf_epochs=15",
                                   "++evaluator.batch_size=16"]))
    assert json.loads(out.read_text())["samples"]["n"] == 30
    # 36 images: 9 test (0.25), 6 val, 21 train; the class prefix precedes the ids, so all 49 codes are targets
    assert m["test"]["tokens"] == 9 * 49 and m["val"]["tokens"] == 6 * 49
    # the image evaluator's bits per image are the headline test NLL over the 7 x 7 codes
    assert m["nll"]["test"]["nats_per_token"] == pytest.approx(m["test"]["nll"])
    assert m["nll"]["test"]["bits_per_image"] == pytest.approx(49 * m["test"]["nll"] / np.log(2))
    # the bar's height is a perfect class cue: the evaluator's classifier must get every test image right,
    # or its features (and every Fréchet distance) describe nothing
    assert m["classifier"]["test_accuracy"] == 1.0 and m["classifier"]["train_images"] == 27
    # sample accuracy: 10 per class, so the mean of the per-class rates, each a multiple of 1/10
    per_class = m["samples"]["per_class_accuracy"]
    assert len(per_class) == 3 and all(abs(10 * a - round(10 * a)) < 1e-9 for a in per_class)
    assert m["samples"]["accuracy"] == pytest.approx(sum(per_class) / 3)
    # VQ metrics, recomputed from the run's saved tokenizer on the same held-out images
    test = ImageDataModule(source="folder", root=str(tmp_path / "imgs"), val_size=6, test_fraction=0.25)
    test.setup()
    real = test.splits["test"].images
    ids = model.tokenizer.encode_batch(real)
    recon = torch.stack([model.tokenizer.decode(row) for row in ids])
    mse = ((recon.double() - real.double()) ** 2).flatten(1).mean(1)  # per image, in 8-bit units
    assert m["vq"]["test_psnr_db"] == pytest.approx(float((10 * torch.log10(255.0**2 / mse)).mean()), abs=1e-3)
    assert m["vq"]["codes_used"] == len(torch.unique(ids)) and m["vq"]["codebook_usage"] == len(torch.unique(ids)) / 32

    vq_metrics = evaluate(_compose("eval", [f"ckpt={vq_dir / 'checkpoints' / 'last.ckpt'}",
                                            f"out={tmp_path / 'vq_eval.json'}", "++evaluator.clf_epochs=1"]))
    assert "vq" in vq_metrics and "samples" not in vq_metrics

    # load() always gives an ARModel; the VQ stage comes from load_stage(), and each refuses the other
    from armodal.api import load_stage
    from armodal.modalities.image import VQLitModule
    from armodal.training.checkpoint import CheckpointError

    assert isinstance(load_stage(vq_dir / "checkpoints" / "last.ckpt"), VQLitModule)
    with pytest.raises(CheckpointError, match="load_stage"):
        load(vq_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match="armodal.load"):
        load_stage(ar_dir / "checkpoints" / "last.ckpt")
