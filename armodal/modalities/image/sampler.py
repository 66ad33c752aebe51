"""Class-conditional image sampling: codes from the AR model, pixels from the VQ decoder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from armodal.generation import GenerationConfig, seeded_generator, unsupported
from armodal.modalities.base import Sampler, register_sampler
from armodal.modalities.image.tokenizer import to_uint8

if TYPE_CHECKING:  # pragma: no cover
    from armodal.ar_model import ARModel

__all__ = ["ImageSampler", "image_settings", "sample_images", "save_grid"]


@torch.no_grad()
def sample_images(
    model: "ARModel",
    labels: torch.Tensor,  # [N] class ids
    config: GenerationConfig | None = None,
    batch_size: int = 500,
    **overrides: Any,
) -> torch.Tensor:
    """Sample one image per label: uint8 [N, C, H, W].

    ``config`` (with ``overrides``, any :class:`GenerationConfig` field) sets the decoding;
    ``cfg_scale`` 1 = plain conditional sampling, 0 = unconditional, > 1 = guided.  One
    random stream (``seed``) runs over all batches.
    """
    config = image_settings(model, (config or GenerationConfig()).replace(**overrides))
    tok = model.tokenizer
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    generator = seeded_generator(config, model.device)
    out = []
    for chunk in labels.split(batch_size):
        gen = model.generate(cond=chunk.to(model.device), config=config, generator=generator)
        ids = gen.ids[:, -tok.seq_len:]  # [b, h*w] code ids (no BOS: the class prefix starts the image)
        out.append(to_uint8(tok.decode_batch(ids.cpu())))
    return torch.cat(out) if out else torch.zeros(0, tok.channels, *tok.image_size, dtype=torch.uint8)


def image_settings(model: "ARModel", config: GenerationConfig) -> GenerationConfig:
    """The settings for one image each: ``max_new_tokens`` is the code grid (an error if set to anything else)."""
    if model.conditioner is None:
        raise ValueError("this image model has no class conditioner; class-conditional sampling needs one")
    n = model.tokenizer.seq_len
    unsupported(config, model.modality, {
        "max_new_tokens": (lambda v: v in (None, n), f"an image is exactly its {n} codes"),
    })
    return config.replace(max_new_tokens=n)


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


@register_sampler("image")
class ImageSampler(Sampler):
    """Writes ``grid.png`` (one row per class, ``num_samples`` columns) and one PNG per sample.

    ``num_samples`` is the number of images *per class*.  Inputs: ``classes`` (class ids;
    default all), ``batch_size`` (images per decode call).
    """

    inputs = ("classes", "batch_size")

    def __init__(self, generation=None, classes: Sequence[int] | None = None, batch_size: int = 500,
                 upscale: int = 2) -> None:
        super().__init__(generation)
        self.classes, self.batch_size, self.upscale = classes, batch_size, upscale

    def __call__(self, model: "ARModel", num_samples: int, out_dir: str | Path, config: GenerationConfig | None = None,
                 **inputs: Any) -> dict:
        config = self.settings(config, inputs)
        p = {"classes": self.classes, "batch_size": self.batch_size,
             **{k: v for k, v in inputs.items() if v is not None}}
        tok = model.tokenizer
        n_cls = tok.num_classes or getattr(model.conditioner, "num_classes", 0)
        classes = list(p["classes"]) if p["classes"] is not None else list(range(n_cls))
        if not classes or any(c < 0 or c >= n_cls for c in classes):
            raise ValueError(f"classes must be ids in [0, {n_cls}), got {classes}")
        per = max(1, int(num_samples))
        labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per)  # [n_cls * per], row-major
        images = sample_images(model, labels, config, int(p["batch_size"]))
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        names = tok.class_names or [str(c) for c in range(n_cls)]
        paths = []
        for j, (img, lab) in enumerate(zip(images, labels.tolist())):
            slug = "".join(ch if ch.isalnum() else "_" for ch in names[lab]).strip("_").lower()
            path = out / "images" / f"class{lab}_{slug}_{j % per:03d}.png"
            _save_png(img, path)
            paths.append(str(path))
        grid = save_grid(images, out / "grid.png", nrow=per, upscale=int(self.upscale))
        return {
            "grid": str(grid),
            "images": [str(grid)] + paths[: 7],
            "files": paths,
            "num_images": len(paths),
            "rows": [names[c] for c in classes],
            "settings": config.changed(),
        }
