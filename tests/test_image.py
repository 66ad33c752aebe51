"""Image modality: VQ model, tokenizer, conditioner/CFG, sampler, data loading and bad input."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from armodal.modalities.image import (
    ClassConditioner,
    ImageDataModule,
    ImageSampler,
    VQConfig,
    VQImageTokenizer,
    VQModel,
    frechet_distance,
    load_image_folder,
    load_vq,
    prepare_fashion_mnist,
    sample_images,
    save_vq,
)
from armodal.generation import GenerationConfig
from armodal.modalities.base import load_tokenizer

SMALL = dict(channels=[8, 16, 16], codebook_size=32, code_dim=4)


def _tiny_model(vq: VQModel | None = None, num_classes: int = 3, seed: int = 0):
    from armodal.ar_model import ARModel
    from armodal.models import build_transformer

    torch.manual_seed(seed)
    vq = vq or VQModel(VQConfig(**SMALL))
    tok = VQImageTokenizer(vq, (28, 28), [f"c{i}" for i in range(num_classes)])
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, d_model=32, n_layer=2, n_head=2,
                            max_seq_len=64)
    cond = ClassConditioner(32, num_classes=num_classes, p_uncond=0.1)
    nn_init = torch.nn.init
    nn_init.normal_(cond.embedding.weight, 0, 1.0)  # make the class prefix matter for an untrained net
    return ARModel(net, tok, cond).eval()


# ----------------------------------------------------------------------------- VQ model
@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_vq_encode_decode_shapes(quantizer):
    vq = VQModel(VQConfig(quantizer=quantizer, fsq_levels=[4, 4, 2], **SMALL))
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    ids = vq.encode(x)
    assert ids.shape == (5, 7, 7) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < vq.num_codes
    assert vq.decode(ids).shape == (5, 1, 28, 28)
    recon, q = vq(x)
    assert recon.shape == x.shape and q.z_q.shape == (5, vq.config.latent_dim, 7, 7)
    # decode(ids) uses exactly the quantized latents of the forward pass
    assert torch.allclose(vq.quantizer.lookup(q.ids), q.z_q.detach(), atol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        vq.encode(torch.zeros(1, 1, 30, 30))


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_straight_through_gradient_reaches_encoder(quantizer):
    vq = VQModel(VQConfig(quantizer=quantizer, fsq_levels=[4, 4, 2], **SMALL))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    recon, _ = vq(x)
    ((recon - x) ** 2).mean().backward()  # reconstruction loss only: no commitment term
    g = vq.encoder.net[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_unused_codes_are_reinitialised():
    torch.manual_seed(0)
    vq = VQModel(VQConfig(reinit_every=1, usage_decay=0.0, dead_code_threshold=0.5, **SMALL)).train()
    before = vq.quantizer.embedding.weight.detach().clone()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    recon, q = vq(x)
    ((recon - x) ** 2).mean().add(q.loss).backward()  # the re-init must not break this step's backward
    assert torch.equal(vq.quantizer.embedding.weight, before)  # deferred to the next forward
    vq(torch.rand(2, 1, 28, 28) * 2 - 1)
    used = torch.unique(q.ids)
    unused = torch.tensor(sorted(set(range(32)) - set(used.tolist())))
    assert len(unused) > 0
    after = vq.quantizer.embedding.weight.detach()
    assert not torch.allclose(after[unused], before[unused])
    assert torch.allclose(after[used], before[used])
    assert vq.quantizer.num_reinit == len(unused)
    # re-initialised codes are encoder outputs on the unit sphere
    assert torch.allclose(after[unused].norm(dim=-1), torch.ones(len(unused)), atol=1e-4)


def test_vq_save_load_roundtrip(tmp_path):
    vq = VQModel(VQConfig(**SMALL))
    save_vq(vq, tmp_path)
    vq2 = load_vq(tmp_path)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(vq.eval().encode(x), vq2.encode(x))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vq(tmp_path / "nope.ckpt")


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip_and_hooks(tmp_path):
    tok = VQImageTokenizer(VQModel(VQConfig(**SMALL)), (28, 28), ["a", "b"])
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    ids = tok.encode(img)
    assert ids.shape == (49,) and tok.vocab_size == 33 and tok.pad_id == 32 and tok.num_types == 49
    out = tok.decode(ids)
    assert out.shape == (1, 28, 28) and out.dtype == torch.uint8
    assert torch.equal(tok.decode(ids), out)  # decoding is deterministic
    assert torch.equal(tok.encode_batch(img[None].repeat(2, 1, 1, 1)), ids[None].repeat(2, 1))
    assert tok.types(ids[None].repeat(2, 1)).tolist()[1] == list(range(49))
    allowed = tok.allowed_next(ids[None])
    assert allowed.shape == (1, 33) and not allowed[0, 32] and allowed[0, :32].all()
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "vq.safetensors").is_file()
    tok2 = load_tokenizer(tmp_path / "tok")
    assert isinstance(tok2, VQImageTokenizer) and tok2.class_names == ["a", "b"]
    assert torch.equal(tok2.encode(img), ids)
    with pytest.raises(ValueError, match="expected images of shape"):
        tok.encode(torch.zeros(3, 28, 28, dtype=torch.uint8))


# ----------------------------------------------------------------------------- conditioner / CFG
def test_class_conditioner_dropout_and_uncond():
    c = ClassConditioner(16, num_classes=4, p_uncond=0.5)
    labels = torch.arange(4).repeat(50)
    c.eval()
    assert c(labels).shape == (200, 1, 16)
    assert torch.equal(c(labels), c.embedding(labels)[:, None])
    null = c.embedding.weight[4]
    assert torch.equal(c.uncond(labels), null.expand(200, 1, 16))
    c.train()
    dropped = (c(labels) == null).all(-1).float().mean()
    assert 0.3 < dropped < 0.7
    with pytest.raises(ValueError, match="class ids"):
        c(torch.tensor([7]))


def test_cfg_scale_zero_equals_unconditional():
    from armodal.generation import generate

    model = _tiny_model()
    labels = torch.tensor([0, 1, 2])
    guided = model.generate(cond=labels, max_new_tokens=49, cfg_scale=0.0, strategy="greedy").ids
    tok = model.tokenizer
    uncond = generate(model.net, max_new_tokens=49, prefix=model.conditioner.uncond(labels), strategy="greedy",
                      types_fn=tok.types, allowed_fn=tok.allowed_next, pad_id=tok.pad_id).ids
    assert torch.equal(guided, uncond)
    cond = model.generate(cond=labels, max_new_tokens=49, cfg_scale=1.0, strategy="greedy").ids
    assert not torch.equal(cond, uncond)  # the class prefix does change the output


def test_sample_images_shape_dtype_and_sampler_files(tmp_path):
    model = _tiny_model()
    imgs = sample_images(model, torch.tensor([0, 2, 1, 1]), batch_size=3, cfg_scale=2.0, top_k=10, top_p=0.9, seed=0)
    assert imgs.shape == (4, 1, 28, 28) and imgs.dtype == torch.uint8
    summary = ImageSampler({"cfg_scale": 2.0})(model, 2, tmp_path, config=GenerationConfig(cfg_scale=2.0, temperature=0.8, seed=3))
    grid = Image.open(summary["grid"])
    assert summary["num_images"] == 6 and len(list((tmp_path / "images").glob("*.png"))) == 6
    assert grid.size[1] > grid.size[0]  # 3 rows (classes) x 2 columns
    one = Image.open(summary["files"][0])
    assert one.size == (28, 28) and one.mode == "L"
    # same seed -> same samples
    again = sample_images(model, torch.tensor([0, 2, 1, 1]), batch_size=3, cfg_scale=2.0, top_k=10, top_p=0.9, seed=0)
    assert torch.equal(imgs, again)
    with pytest.raises(TypeError, match=r"ImageSampler got unknown input\(s\) \['bogus'\]; it takes \['classes', 'batch_size'\]"):
        ImageSampler()(model, 1, tmp_path, bogus=1)
    with pytest.raises(TypeError, match="generation settings go in config="):
        ImageSampler()(model, 1, tmp_path, temperature=0.5)


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    assert frechet_distance(a, b) < 0.1
    assert abs(frechet_distance(a, a + 1.0) - 8.0) < 0.05  # mean shift of 1 in 8 dims


# ----------------------------------------------------------------------------- data: folders and bad input
def _write_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 4, size: int = 28, mode: str = "L"):
    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.zeros((size, size), dtype=np.uint8)
            arr[:, ci * 8:(ci + 1) * 8] = 200  # a class-specific stripe
            arr = np.clip(arr + rng.integers(0, 40, arr.shape), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr, "L").convert(mode)
            img.save(root / c / f"{i}.png")


def test_image_folder_bad_input(tmp_path):
    root = tmp_path / "imgs"
    _write_folder(root, per_class=2)
    (root / "cat" / "notes.txt").write_text("not an image")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.full((28, 28, 4), 100, np.uint8), "RGBA").save(root / "owl" / "alpha.png")
    Image.fromarray(np.full((28, 28), 40000, np.uint16)).save(root / "owl" / "deep.png")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = load_image_folder(root, channels=1)
    msgs = [str(w.message) for w in rec]
    assert any("skipping" in m and "notes.txt" in m for m in msgs)
    assert any("skipping" in m and "truncated.png" in m for m in msgs)
    assert any("converted" in m and "alpha.png" in m for m in msgs)
    assert any("converted" in m and "deep.png" in m for m in msgs)
    assert any("loaded 8 images, skipped 2, converted 2" in m for m in msgs)
    assert s.images.shape == (8, 1, 28, 28) and s.images.dtype == torch.uint8
    assert s.class_names == ["cat", "dog", "owl"] and s.labels.tolist().count(2) == 4
    deep = s.images[s.labels == 2][-1]  # files sort as 0, 1, alpha, deep; 40000/65535 of full scale
    assert abs(int(deep.float().mean()) - round(40000 / 65535 * 255)) <= 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageDataModule(source="folder", root=str(tmp_path / "missing")).prepare_data()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path / "flat")
    (tmp_path / "junk" / "x").mkdir(parents=True)
    (tmp_path / "junk" / "x" / "a.txt").write_text("hi")
    with pytest.warns(UserWarning, match="a.txt"), pytest.raises(ValueError, match="no readable images"):
        load_image_folder(tmp_path / "junk")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "no_idx", tmp_path / "cache")


def _banded(height: int, width: int, tall: bool) -> np.ndarray:
    """Black ends, a white middle: the centre square of the image is all white, the ends are black."""
    arr = np.zeros((height, width, 3), np.uint8)
    if tall:
        arr[(height - width) // 2 : (height + width) // 2] = 255
    else:
        arr[:, (width - height) // 2 : (width + height) // 2] = 255
    return arr


def test_image_folder_rgb_resize_crop(tmp_path):
    """The short side is resized to image_size and the centre square kept: a squash to the square
    (or a crop of one end) would bring the black ends in."""
    root = tmp_path / "rgb"
    _write_folder(root, per_class=3, size=40, mode="RGB")
    Image.fromarray(_banded(80, 40, tall=True)).save(root / "cat" / "tall.png")
    Image.fromarray(_banded(40, 100, tall=False)).save(root / "dog" / "wide.png")
    s = load_image_folder(root, channels=3, image_size=32)
    assert s.images.shape == (11, 3, 32, 32)
    tall, wide = s.images[3], s.images[7]  # files sort as 0, 1, 2, tall / wide within cat / dog
    for img in (tall, wide):
        assert (img[:, 1:-1, 1:-1] == 255).all(), img[0]  # inside the centre square (edges blur)
    striped = s.images[0, 0]  # a square 40 px image only shrinks: its 8 px stripe becomes 6.4 px
    assert (striped[:, 1:5] > 150).all() and (striped[:, 8:] < 100).all()
    dm = ImageDataModule(source="folder", root=str(root), channels=3, image_size=32, val_size=2, test_fraction=0.2,
                         batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 11 and sizes["val"] == 2 and sizes["test"] == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].min() >= -1 and batch["image"].max() <= 1


def test_fashion_mnist_idx_gunzip_fixture(tmp_path):
    """The IDX reader path, on a generated miniature of the Debian package's files."""
    raw = tmp_path / "debian"
    raw.mkdir()

    def idx(path, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    written = {}
    for split, n in (("train", 30), ("t10k", 10)):
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = np.arange(n)  # the top-left pixel names the image
        images[:, 27, 3] = 255 - np.arange(n)  # and an off-diagonal one: a transposed read would differ
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        idx(raw / f"{split}-images-idx3-ubyte.gz", images)
        idx(raw / f"{split}-labels-idx1-ubyte.gz", labels)
        written[split] = (torch.from_numpy(images)[:, None], torch.from_numpy(labels).long())
    dm = ImageDataModule(source="fashion_mnist", root=str(raw), cache_dir=str(tmp_path / "cache"), val_size=5)
    dm.prepare_data()
    dm.setup()
    assert len(list((tmp_path / "cache").glob("fashion_mnist-*/FashionMNIST/raw/train-images-idx3-ubyte"))) == 1
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 25, "val": 5, "test": 10}
    assert dm.class_names[9] == "Ankle boot"
    test = dm.splits["test"]  # the t10k file, in file order
    assert test.images.dtype == torch.uint8 and torch.equal(test.images, written["t10k"][0])
    assert torch.equal(test.labels, written["t10k"][1])
    # train + val: every written image exactly once, each with its own label
    images = torch.cat([dm.splits["train"].images, dm.splits["val"].images])
    labels = torch.cat([dm.splits["train"].labels, dm.splits["val"].labels])
    order = images[:, 0, 0, 0].long()
    assert sorted(order.tolist()) == list(range(30))
    assert torch.equal(images, written["train"][0][order]) and torch.equal(labels, written["train"][1][order])


FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(tmp_path):
    from armodal.modalities.image import load_fashion_mnist

    train = load_fashion_mnist(FMNIST_DIR, tmp_path, train=True)
    test = load_fashion_mnist(FMNIST_DIR, tmp_path, train=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    vq = VQModel(VQConfig(**SMALL))
    tok = VQImageTokenizer(vq, (28, 28), train.class_names)
    assert tok.encode_batch(test.images[:4]).shape == (4, 49)
