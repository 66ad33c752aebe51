"""Class-conditional image sampling: codes from the AR model, pixels from the VQ decoder."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from armodal.modalities.base import Sampler
from armodal.modalities.image.tokenizer import to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from armodal.ar_model import ARModel

__all__ = ["ImageSampler", "sample_images", "save_grid"]


@torch.no_grad()
def sample_images(
    model: "ARModel",
    labels: torch.Tensor,  # [N] class ids
    cfg_scale: float = 3.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    batch_size: int = 500,
    seed: int | None = 0,
) -> torch.Tensor:
    """Sample one image per label: uint8 [N, C, H, W].

    ``cfg_scale`` 1 = plain conditional sampling, 0 = unconditional, > 1 = guided.
    """
    tok = model.tokenizer
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if model.conditioner is None:
        raise ValueError("this image model has no class conditioner; class-conditional sampling needs one")
    out = []
    for i, chunk in enumerate(labels.split(batch_size)):
        gen = model.generate(
            cond=chunk.to(model.device), num_samples=1, max_new_tokens=tok.seq_len, cfg_scale=cfg_scale,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            seed=None if seed is None else seed + i,
        )
        ids = gen.ids[:, -tok.seq_len:]  # [b, h*w] code ids (no BOS: the class prefix starts the image)
        out.append(to_uint8(tok.decode_batch(ids.cpu())))
    return torch.cat(out) if out else torch.zeros(0, tok.channels, *tok.image_size, dtype=torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, upscale: int = 2) -> Path:
    """uint8 [N, C, H, W] -> one PNG grid with ``nrow`` images per row."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)  # [3, H', W'] uint8
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = image.permute(1, 2, 0).numpy()  # [H, W, C]
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


class ImageSampler(Sampler):
    """Writes ``grid.png`` (one row per class, ``num_samples`` columns) and one PNG per sample.

    ``num_samples`` is the number of images *per class*.  Sampling settings given to the
    constructor are defaults; ``armodal-generate`` overrides arrive as keyword arguments.
    """

    _KEYS = ("cfg_scale", "temperature", "top_k", "top_p", "min_p", "batch_size", "seed", "classes", "upscale")
    _IGNORED = ("max_new_tokens", "constrained", "repetition_penalty", "greedy", "prompt_tokens")

    def __init__(
        self,
        cfg_scale: float = 3.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        batch_size: int = 500,
        seed: int | None = 0,
        classes: Sequence[int] | None = None,
        upscale: int = 2,
    ) -> None:
        self.defaults = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             batch_size=batch_size, seed=seed, classes=classes, upscale=upscale)

    def __call__(self, model: "ARModel", num_samples: int, out_dir: str | Path, **overrides: Any) -> dict:
        if overrides.get("prompt") is not None:
            raise ValueError("image sampling takes no prompt file; pick classes with sampler.classes=[...]")
        unknown = set(overrides) - set(self._KEYS) - set(self._IGNORED) - {"prompt"}
        if unknown:
            raise TypeError(f"ImageSampler got unknown settings {sorted(unknown)}; known: {list(self._KEYS)}")
        seq_len = model.tokenizer.seq_len
        if overrides.get("max_new_tokens") not in (None, seq_len):
            warnings.warn(f"max_new_tokens is fixed to the code grid size {seq_len} for images", stacklevel=2)
        p = {**self.defaults, **{k: v for k, v in overrides.items() if k in self._KEYS and v is not None}}
        tok = model.tokenizer
        n_cls = tok.num_classes or getattr(model.conditioner, "num_classes", 0)
        classes = list(p["classes"]) if p["classes"] is not None else list(range(n_cls))
        if not classes or any(c < 0 or c >= n_cls for c in classes):
            raise ValueError(f"classes must be ids in [0, {n_cls}), got {classes}")
        per = max(1, int(num_samples))
        labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per)  # [n_cls * per], row-major
        images = sample_images(model, labels, p["cfg_scale"], p["temperature"], int(p["top_k"]), p["top_p"],
                               p["min_p"], int(p["batch_size"]), p["seed"])
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        names = tok.class_names or [str(c) for c in range(n_cls)]
        paths = []
        for j, (img, lab) in enumerate(zip(images, labels.tolist())):
            slug = "".join(ch if ch.isalnum() else "_" for ch in names[lab]).strip("_").lower()
            path = out / "images" / f"class{lab}_{slug}_{j % per:03d}.png"
            _save_png(img, path)
            paths.append(str(path))
        grid = save_grid(images, out / "grid.png", nrow=per, upscale=int(p["upscale"]))
        return {
            "grid": str(grid),
            "images": [str(grid)] + paths[: 7],
            "files": paths,
            "num_images": len(paths),
            "rows": [names[c] for c in classes],
            "settings": {k: p[k] for k in ("cfg_scale", "temperature", "top_k", "top_p", "min_p", "seed")},
        }
