"""Image data: Fashion-MNIST from the Debian IDX files, generic class-subfolder datasets,
and two datamodules: pixels (for the VQ stage) and pre-tokenized code grids (AR stage).

Every source is loaded once into memory as ``ImageSet(images uint8 [N, C, H, W],
labels long [N], class_names)``; the datasets are small (Fashion-MNIST: 47 MB).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from armodal.modalities.base import register_datamodule
from armodal.utils.cache import atomic_write, content_key, is_complete, mark_complete, writable_dir
from armodal.training.resume import ResumableLoader

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ImageSet",
    "prepare_fashion_mnist",
    "load_fashion_mnist",
    "load_image_folder",
    "ImageDataModule",
    "ImageCodesDataModule",
]

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_FMNIST_FILES = [
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # long [N]
    class_names: list[str]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.labels[index], self.class_names)


# ----------------------------------------------------------------------------- Fashion-MNIST
def prepare_fashion_mnist(raw_dir: str | Path, cache_dir: str | Path) -> Path:
    """Gunzip the Debian package's IDX files into ``cache_dir/fashion_mnist-<key>/FashionMNIST/raw`` (once).

    ``key`` covers the folder and every source file's size, mtime and SHA-256, so other or
    replaced files never reuse a stale copy; the copy is used only once complete.  A read-only
    cache: a warning, then a temporary folder.  Returns the torchvision root.  No network access.
    """
    raw_dir = Path(raw_dir)
    srcs = [raw_dir / f"{f}.gz" if (raw_dir / f"{f}.gz").is_file() else raw_dir / f for f in _FMNIST_FILES]
    missing = [f for f, src in zip(_FMNIST_FILES, srcs) if not src.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {raw_dir} (missing {missing}); install the Debian "
            "package with `apt-get install dataset-fashion-mnist` or set modality.data.root to a copy"
        )
    base = writable_dir(cache_dir, "cache")
    if base is None:
        base = Path(tempfile.mkdtemp(prefix="armodal-fmnist-"))
    root = base / f"fashion_mnist-{content_key(raw_dir, srcs)}"
    out = root / "FashionMNIST" / "raw"
    if not is_complete(out):
        for f, src in zip(_FMNIST_FILES, srcs):
            def write(tmp: Path, src: Path = src) -> None:
                with (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout)

            atomic_write(out / f, write)
        mark_complete(out, source=str(raw_dir))
    return root


def load_fashion_mnist(raw_dir: str | Path, cache_dir: str | Path, train: bool) -> ImageSet:
    """Fashion-MNIST split via torchvision's IDX reader: uint8 [N, 1, 28, 28]."""
    from torchvision.datasets import FashionMNIST

    root = prepare_fashion_mnist(raw_dir, cache_dir)
    ds = FashionMNIST(root=str(root), train=train, download=False)
    return ImageSet(ds.data[:, None].contiguous(), ds.targets.long(), list(FASHION_MNIST_CLASSES))


# ----------------------------------------------------------------------------- image folders
def _to_mode(img, path: Path, channels: int) -> tuple[Any, str | None]:
    """Convert a PIL image to L (channels=1) or RGB (channels=3); note what was converted."""
    from PIL import Image

    note = None
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit grayscale: rescale to 8 bit
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if mode.startswith("I;16") or arr.max() > 255 else (0.0, 255.0)
        arr = np.clip((arr - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8)
        img, note = Image.fromarray(arr, mode="L"), f"{mode} (high bit depth) rescaled to 8-bit"
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # composite on white
        img = Image.alpha_composite(bg, rgba)
        note = f"{mode} with alpha composited on white"
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        if note is None and mode not in ("L", "RGB", "P", "1"):
            note = f"{mode} converted to {target}"
        img = img.convert(target)
    return img, note


def load_image_folder(
    root: str | Path,
    channels: int = 1,
    image_size: int | None = None,
    crop: str = "center",
    resize: bool = True,
) -> ImageSet:
    """Load ``root/<class>/<image>`` into memory.

    ``channels`` 1 (grayscale) or 3 (RGB); images are resized so the short side is
    ``image_size`` and then cropped (``crop``: "center" or "none") to ``image_size`` squared.
    Non-image files and truncated/unreadable images are skipped, odd modes (RGBA,
    16-bit, palette) converted; each gets a warning naming the file and a final count
    is reported.  A missing ``root`` is a :class:`FileNotFoundError`.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets.folder import find_classes
    from torchvision.transforms import v2 as T

    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} is not a directory")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError as e:
        raise ValueError(f"image folder {root} has no class subfolders (expected root/<class>/<image>): {e}") from None
    if crop not in ("center", "none"):
        raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    ops: list = []
    if image_size is not None and resize:
        ops.append(T.Resize(image_size, antialias=True))
    if image_size is not None and crop == "center":
        ops.append(T.CenterCrop(image_size))
    transform = T.Compose(ops) if ops else None

    images, labels = [], []
    skipped, converted = 0, 0
    shape: tuple | None = None
    for cls in classes:
        for path in sorted(p for p in (root / cls).rglob("*") if p.is_file()):
            try:
                with Image.open(path) as im:
                    im.load()  # forces a full decode: truncated files fail here
                    im, note = _to_mode(im, path, channels)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                warnings.warn(f"skipping {path}: not a readable image ({type(e).__name__}: {e})", stacklevel=2)
                skipped += 1
                continue
            if note is not None:
                warnings.warn(f"converted {path}: {note}", stacklevel=2)
                converted += 1
            x = torch.from_numpy(np.array(im, dtype=np.uint8, copy=True))
            x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)  # [C, H, W]
            if transform is not None:
                x = transform(x)
            if shape is None:
                shape = tuple(x.shape)
            elif tuple(x.shape) != shape:
                warnings.warn(
                    f"skipping {path}: size {tuple(x.shape)} differs from {shape}; set image_size to resize",
                    stacklevel=2,
                )
                skipped += 1
                continue
            images.append(x)
            labels.append(class_to_idx[cls])
    if skipped or converted:
        warnings.warn(f"image folder {root}: loaded {len(images)} images, skipped {skipped}, converted {converted}",
                      stacklevel=2)
    if not images:
        raise ValueError(f"image folder {root}: no readable images found (skipped {skipped})")
    return ImageSet(torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.long), classes)


# ----------------------------------------------------------------------------- datasets
class _PixelDataset(Dataset):
    def __init__(self, s: ImageSet, hflip: bool = False) -> None:
        self.s, self.hflip = s, hflip

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, i: int) -> dict:
        x = self.s.images[i].float() / 127.5 - 1.0  # [C, H, W] in [-1, 1]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x, "label": self.s.labels[i]}


class _CodesDataset(Dataset):
    def __init__(self, codes: torch.Tensor, labels: torch.Tensor) -> None:
        self.codes, self.labels = codes, labels  # [N, T], [N]
        self.types = torch.arange(codes.shape[1])  # [T]: raster cell index = 2D position

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, i: int) -> dict:
        ids = self.codes[i].long()
        return {"ids": ids, "types": self.types, "cond": self.labels[i],
                "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


# ----------------------------------------------------------------------------- datamodules
@register_datamodule("image.pixels")
class ImageDataModule(pl.LightningDataModule):
    """Pixel batches ``{"image": [B, C, H, W] in [-1, 1], "label": [B]}`` (the VQ stage).

    ``source``: ``"fashion_mnist"`` (``root`` = directory of the Debian IDX files) or
    ``"folder"`` (``root/<class>/<image>``; ``root/train`` + ``root/test`` are used as
    splits when both exist).  ``val_size`` images (or fraction when < 1) are held out
    of train with a fixed ``seed``.  ``.tokenizer`` is None in this mode.
    """

    def __init__(
        self,
        source: str = "fashion_mnist",
        root: str = "/usr/share/datasets/fashion-mnist",
        cache_dir: str = "data_cache",
        channels: int = 1,
        image_size: int | None = None,
        crop: str = "center",
        val_size: float = 5000,
        test_fraction: float = 0.1,
        batch_size: int = 128,
        num_workers: int = 0,
        hflip: bool = False,
        seed: int = 0,
        max_train: int | None = None,
    ) -> None:
        super().__init__()
        if source not in ("fashion_mnist", "folder"):
            raise ValueError(f"source must be 'fashion_mnist' or 'folder', got {source!r}")
        self.source, self.root, self.cache_dir = source, Path(root), Path(cache_dir)
        self.channels, self.image_size, self.crop = channels, image_size, crop
        self.val_size, self.test_fraction = val_size, test_fraction
        self.batch_size, self.num_workers, self.hflip, self.seed = batch_size, num_workers, hflip, seed
        self.max_train = max_train
        self.tokenizer = None
        self.splits: dict[str, ImageSet] | None = None

    # -- loading ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.source == "fashion_mnist":
            prepare_fashion_mnist(self.root, self.cache_dir)
        elif not self.root.exists():
            raise FileNotFoundError(f"image folder {self.root} does not exist")

    def _load(self) -> dict[str, ImageSet]:
        g = torch.Generator().manual_seed(self.seed)
        if self.source == "fashion_mnist":
            train = load_fashion_mnist(self.root, self.cache_dir, train=True)
            test = load_fashion_mnist(self.root, self.cache_dir, train=False)
        else:
            kw = dict(channels=self.channels, image_size=self.image_size, crop=self.crop)
            if (self.root / "train").is_dir() and (self.root / "test").is_dir():
                train, test = load_image_folder(self.root / "train", **kw), load_image_folder(self.root / "test", **kw)
            else:
                full = load_image_folder(self.root, **kw)
                perm = torch.randperm(len(full), generator=g)
                n_test = max(1, int(round(self.test_fraction * len(full))))
                train, test = full.subset(perm[n_test:]), full.subset(perm[:n_test])
        n_val = int(self.val_size if self.val_size >= 1 else round(self.val_size * len(train)))
        n_val = min(max(n_val, 1), len(train) - 1)
        perm = torch.randperm(len(train), generator=g)
        val, train = train.subset(perm[:n_val]), train.subset(perm[n_val:])
        if self.max_train is not None:
            train = train.subset(torch.arange(min(self.max_train, len(train))))
        return {"train": train, "val": val, "test": test}

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self._load()
            log.info("image data: %s", {k: len(v) for k, v in self.splits.items()})

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return self.splits["train"].class_names

    # -- loaders -------------------------------------------------------------------------
    def _dataset(self, split: str) -> Dataset:
        return _PixelDataset(self.splits[split], hflip=self.hflip and split == "train")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        loader = ResumableLoader if split == "train" else DataLoader  # train: resumes mid-epoch exactly
        return loader(self._dataset(split), batch_size=self.batch_size, shuffle=shuffle,
                      num_workers=self.num_workers, drop_last=shuffle and len(self.splits[split]) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


@register_datamodule("image.codes")
class ImageCodesDataModule(ImageDataModule):
    """Pre-tokenized code grids for the AR stage (the VQ encoder never runs in training).

    ``setup()`` loads the VQ model from ``vq_ckpt``, builds ``.tokenizer``
    (:class:`VQImageTokenizer`) and encodes every split once, caching the codes under
    ``cache_dir/image_codes/<key>.pt`` (key = dataset + VQ weights hash).  Batches:
    ``ids`` [B, h*w] raster-order codes, ``types`` [B, h*w] cell index, ``cond`` [B]
    class labels, ``loss_mask`` [B, h*w] all True (the class prefix predicts code 0).
    """

    def __init__(self, vq_ckpt: str | None = None, encode_batch_size: int = 500, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if vq_ckpt is None:
            raise ValueError("ImageCodesDataModule needs vq_ckpt: the VQ tokenizer checkpoint from image_fmnist_vq")
        self.vq_ckpt = Path(vq_ckpt)
        self.encode_batch_size = encode_batch_size
        self.codes: dict[str, torch.Tensor] | None = None

    def setup(self, stage: str | None = None) -> None:
        from armodal.modalities.image.tokenizer import VQImageTokenizer
        from armodal.modalities.image.vq_module import load_vq

        if self.codes is not None:
            return
        super().setup(stage)
        vq = load_vq(self.vq_ckpt)
        s = self.splits["train"]
        self.tokenizer = VQImageTokenizer(vq, image_size=tuple(s.images.shape[-2:]), class_names=s.class_names)
        base = writable_dir(self.cache_dir / "image_codes", "cache")  # read-only: warn, run without the cache
        path = base / f"{self._cache_key(vq)}.pt" if base is not None else None
        if path is not None and path.is_file():
            try:
                self.codes = torch.load(path, weights_only=True)
            except Exception as e:  # noqa: BLE001 - a damaged entry is recomputed
                log.warning("%s: unreadable code cache (%s); re-encoding", path, type(e).__name__)
            else:
                log.info("loaded cached code grids from %s", path)
                return
        codes = {}
        for split, data in self.splits.items():
            codes[split] = torch.cat([
                self.tokenizer.encode_batch(data.images[i:i + self.encode_batch_size])
                for i in range(0, len(data), self.encode_batch_size)
            ]).to(torch.int32)  # [N, h*w]
        if path is not None:
            try:
                atomic_write(path, lambda tmp: torch.save(codes, tmp))
                log.info("cached code grids at %s", path)
            except OSError as e:
                log.warning("%s: could not write the code cache (%s); continuing without it", path, e)
        self.codes = codes

    def _cache_key(self, vq) -> str:
        h = hashlib.sha1()
        for k, v in sorted(vq.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        s = self.splits
        for split in ("train", "val", "test"):  # every image and label: a replaced image changes the key
            h.update(str(len(s[split])).encode())
            h.update(s[split].images.contiguous().numpy().tobytes())
            h.update(s[split].labels.contiguous().numpy().tobytes())
        h.update(f"{self.source}:{self.root.resolve()}:{self.seed}:{self.val_size}".encode())
        return h.hexdigest()[:16]

    def _dataset(self, split: str) -> Dataset:
        return _CodesDataset(self.codes[split], self.splits[split].labels)
