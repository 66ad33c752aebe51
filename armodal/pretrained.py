"""The shareable model format: a folder that loads without unpickling anything (Hugging Face style).

``armodal-export ckpt=... out=DIR`` writes::

    DIR/
      model.safetensors   the network (and conditioner) weights: "net.*", "conditioner.*"
      config.yaml         the training config (resolved; checked like any saved config on load)
      tokenizer/          the tokenizer files (JSON, safetensors, npz arrays; never pickles)
      manifest.json       format version, modality, weight source, SHA-256 of every file above
      README.md           a short model card

``armodal.load(DIR)`` verifies every hash in the manifest, reads the config with a YAML safe
loader and the same target checks as a checkpoint's config, the weights with ``safetensors``
and the tokenizer from its JSON; non-finite weights are refused.  Nothing goes through pickle.

``save_pretrained(..., quantize="int8")`` (``armodal-export quantize=int8``) stores the network's
linear weights quantised (:mod:`armodal.generation.quantize`: int8 per channel, or int4 groups) and
records ``{"quantize": mode}`` in the manifest's ``"transform"`` entry (``null`` otherwise);
:func:`load_pretrained` rebuilds the quantised modules before loading those weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from armodal.ar_model import ARModel
from armodal.modalities.base import TOKENIZER_FILE, load_tokenizer
from armodal.training.checkpoint import CheckpointError, file_hashes, sha256_file, verify_tokenizer_files, verify_weights
from armodal.utils.safety import safe_config

__all__ = ["save_pretrained", "load_pretrained", "is_pretrained_dir", "export_tensors", "MANIFEST", "FORMAT",
           "FORMAT_VERSION", "WEIGHTS_FILE"]

MANIFEST = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
FORMAT = "armodal-pretrained"
FORMAT_VERSION = 1


def is_pretrained_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def export_tensors(model: ARModel) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``({name: tensor}, {tied name: stored name})``: contiguous CPU copies; a tensor shared by two
    names (tied embeddings) is stored once and the second name recorded as tied to the first."""
    parts = {"net": model.net, **({"conditioner": model.conditioner} if model.conditioner is not None else {})}
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for prefix, module in parts.items():
        for k, v in module.state_dict(keep_vars=False).items():
            name = f"{prefix}.{k}"
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
            if v.numel() and key in seen:
                tied[name] = seen[key]
                continue
            seen[key] = name
            tensors[name] = v.detach().to("cpu").contiguous().clone()
    return tensors, tied


def _model_card(manifest: dict) -> str:
    return (
        f"# {manifest['name']} (armodal, modality: {manifest['modality']})\n\n"
        f"An autoregressive model trained with armodal, exported from `{manifest['source']['checkpoint']}` "
        f"({manifest['weights']['source']} weights).\n\n"
        "```python\nimport armodal\nmodel = armodal.load(\"<this folder>\")\n"
        "out = model.generate(num_samples=1, max_new_tokens=256)\n```\n\n"
        "Files: `model.safetensors` (weights), `config.yaml` (training config), `tokenizer/`, `manifest.json` "
        "(SHA-256 of every file, checked on load).\n"
    )


EXPORT_QUANTIZE = ("none", "int8", "int4")  # int8_dynamic's fbgemm-packed weights are no plain tensors


def save_pretrained(model: ARModel, out: str | Path, *, weights_source: str = "ema", source_checkpoint: str = "",
                    overwrite: bool = False, quantize: str = "none") -> Path:
    """Write ``model`` as a shareable folder (see the module docstring); the folder appears complete or not at all.

    ``quantize``: ``int8`` / ``int4`` store the network's linear weights quantised (the model is not changed).
    """
    from safetensors.torch import save_file

    import armodal
    from armodal.generation.quantize import quantized

    if model.config is None:
        raise ValueError("save_pretrained needs a model with its training config (load it with armodal.load)")
    if quantize not in EXPORT_QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: an export stores one of {', '.join(EXPORT_QUANTIZE)} "
                         "(int8_dynamic is a decoding option: generate with quantize=int8_dynamic)")
    if getattr(model.net, "quantized", None) and quantize != "none":
        raise ValueError(f"quantize={quantize}: this model is quantised already ({model.net.quantized})")
    if quantize != "none":
        model = ARModel(quantized(model.net, quantize), model.tokenizer, model.conditioner, model.config)
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=true to replace it")
        if not is_pretrained_dir(out):
            raise FileExistsError(f"overwrite=true: {out} is not an armodal export (no {MANIFEST}); refusing to "
                                  "delete it. Pick an empty or new folder")
    tensors, tied = export_tensors(model)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source_checkpoint or 'model'}: non-finite weights in {', '.join(bad[:3])}; not exported")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "armodal": FORMAT})
        (tmp / CONFIG_FILE).write_text(OmegaConf.to_yaml(model.config, resolve=True))
        model.tokenizer.save(tmp / "tokenizer")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "armodal_version": armodal.__version__,
            "name": str(model.config.get("name") or model.modality),
            "modality": model.modality,
            "weights": {"file": WEIGHTS_FILE, "source": weights_source, "tied": tied,
                        "num_tensors": len(tensors), "num_params": int(sum(v.numel() for v in tensors.values()))},
            "transform": None if quantize == "none" else {"quantize": quantize},
            "source": {"checkpoint": str(source_checkpoint)},
            "files": {},
        }
        (tmp / "README.md").write_text(_model_card(manifest))
        manifest["files"] = file_hashes(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _verify_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an armodal export manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('format_version')} is newer than this armodal "
                              f"reads ({FORMAT_VERSION}); upgrade armodal")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files or CONFIG_FILE not in files:
        raise CheckpointError(f"{path}: the manifest lists no weights/config hashes")
    for rel, digest in sorted(files.items()):
        f = directory / rel
        if not f.resolve().is_relative_to(directory.resolve()):
            raise CheckpointError(f"{path}: {rel!r} points outside the folder")
        if not f.is_file():
            raise CheckpointError(f"{directory}: {rel} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{directory}: {rel} does not match its SHA-256 in {MANIFEST} "
                                  "(the file was corrupted or edited)")
    return manifest


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu",
                    expect_modality: str | None = None) -> ARModel:
    """Rebuild an :class:`ARModel` from a folder written by :func:`save_pretrained` (no pickle involved)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = _verify_manifest(directory)
    if expect_modality is not None and manifest.get("modality") != expect_modality:
        raise CheckpointError(f"{directory}: an export for modality {manifest.get('modality')!r}, but "
                              f"{expect_modality!r} was expected")
    cfg = safe_config(OmegaConf.load(directory / CONFIG_FILE), source=str(directory / CONFIG_FILE))
    tok_dir = directory / "tokenizer"
    recorded = {k.removeprefix("tokenizer/"): v for k, v in manifest["files"].items() if k.startswith("tokenizer/")}
    verify_tokenizer_files(tok_dir, recorded, directory)
    if not (tok_dir / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{directory}: no tokenizer/{TOKENIZER_FILE}")
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.modality != cfg.modality.get("name"):
        raise CheckpointError(f"{directory}: tokenizer is for {tokenizer.modality!r}, config says {cfg.modality.name!r}")
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{directory / WEIGHTS_FILE}: unreadable weights ({e})") from None
    for name, stored in (manifest["weights"].get("tied") or {}).items():
        if stored not in tensors:
            raise CheckpointError(f"{directory}: tied tensor {name} refers to missing {stored}")
        tensors[name] = tensors[stored]
    verify_weights(tensors, None, directory / WEIGHTS_FILE)
    net = instantiate(cfg.model, vocab_size=tokenizer.vocab_size, num_types=tokenizer.num_types)
    transform = manifest.get("transform") or {}
    if transform:
        from armodal.generation.quantize import quantize_weights

        mode = transform.get("quantize") if isinstance(transform, dict) else None
        if mode not in EXPORT_QUANTIZE[1:]:
            raise CheckpointError(f"{directory / MANIFEST}: unknown weight transform {transform!r} (this armodal reads "
                                  f"quantize = {', '.join(EXPORT_QUANTIZE[1:])})")
        quantize_weights(net, mode)  # the quantised modules, whose buffers the stored weights fill
    cond = None
    if cfg.modality.get("conditioner") is not None:
        cond = instantiate(cfg.modality.conditioner, d_model=net.config.d_model)
    try:
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        if cond is not None:
            cond.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("conditioner.")})
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: weights do not match config.yaml ({' '.join(str(e).split())[:300]})") from None
    return ARModel(net, tokenizer, cond, cfg, str(directory)).to(device).eval()
