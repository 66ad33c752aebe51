"""What a modality plugs into armodal.

A modality is a config group file ``conf/modality/<name>.yaml`` holding ``_target_``
blocks for four parts; the shared transformer never sees the modality's name.

* ``data``: a LightningDataModule.  After ``setup()`` it exposes ``.tokenizer``
  (a :class:`Tokenizer`) and yields batches as dicts:

  - ``ids``: LongTensor [B, T] token ids;
  - ``types``: optional LongTensor [B, T] type ids (voice, channel, 2D cell...);
  - ``cond``: optional conditioning input handed to the conditioner (labels,
    features...);
  - ``loss_mask``: optional BoolTensor [B, T], True where token t is a training
    target (default: every non-pad token after the first, or every non-pad token
    when a prefix precedes the ids).

* ``conditioner`` (optional): a :class:`Conditioner` ``nn.Module`` mapping
  ``cond`` to a continuous prefix [B, P, d_model]; ``d_model`` is injected.
* ``sampler``: a :class:`Sampler` that turns a loaded model into files a person
  can look at or listen to.
* ``evaluator`` (optional): a callable ``(model, datamodule, out_dir, **kw) -> dict``
  of domain metrics for ``armodal-eval`` (numbers, possibly nested; paths of files it wrote
  may sit beside them).

Every part registers under a short name (``@register_tokenizer("music.jsb")`` ...), see
:mod:`armodal.utils.registry`; the contract tests (``tests/test_contract.py``) run over the
registry, so a new modality inherits them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from armodal.generation.config import GenerationConfig
from armodal.utils import registry
from armodal.utils.registry import (
    register_conditioner,
    register_datamodule,
    register_evaluator,
    register_sampler,
    register_tokenizer,
)

__all__ = [
    "Tokenizer",
    "Conditioner",
    "Sampler",
    "MissingSplitError",
    "load_tokenizer",
    "TokenizerFileError",
    "TOKENIZER_FILE",
    "TOKENIZER_FORMAT",
    "LEGACY_TOKENIZER_TARGETS",
    "OUTPUT_KINDS",
    "register_tokenizer",
    "register_datamodule",
    "register_conditioner",
    "register_sampler",
    "register_evaluator",
]

TOKENIZER_FILE = "tokenizer.json"
# 1: {"_target_": "<module path of the class>", "state": ...} (before short names; read via the table below)
# 2: {"tokenizer": "<registered short name>", "format": 2, "state": ...}
TOKENIZER_FORMAT = 2

# Format-1 files name a module path; the short name each one means now.  Classes that have never moved
# are found by their path among the registered tokenizers, so only renamed paths need a line here.
LEGACY_TOKENIZER_TARGETS = {
    "armodal.modalities.music.jsb.JSBTokenizer": "music.jsb",
    "armodal.modalities.music.tokenizer.MidiTokenizer": "music.midilike",  # the kind is in the state
    "armodal.modalities.spatial._tokenizer.RVQExpressionTokenizer": "spatial.rvq",
    "armodal.modalities.spatial._tokenizer.BinnedExpressionTokenizer": "spatial.binned",
}

# What a sampler's summary may declare, each a list of paths of files it wrote: "images" (PNG),
# "audio" (WAV), "text" (UTF-8 text) are logged by the sample callback to TensorBoard; every kind,
# "files" (MIDI, h5ad, JSON ...) included, is listed in the run's samples/samples.csv.
OUTPUT_KINDS = ("images", "audio", "text", "files")


class TokenizerFileError(ValueError):
    """A saved tokenizer file that cannot be read back (names the file and the problem)."""


class Tokenizer(ABC):
    """ids in and out.  Subclasses implement a few hooks; saving/loading is shared.

    Subclasses set ``pad_id`` (always), and ``bos_id`` / ``eos_id`` (or None).
    """

    modality: str = "abstract"  # the modality this tokenizer belongs to (checked at load)
    pad_id: int = 0
    bos_id: int | None = None
    eos_id: int | None = None

    # -- hooks -------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def num_types(self) -> int:
        """Size of the type-id vocabulary (0: this modality uses no type stream)."""
        return 0

    @abstractmethod
    def encode(self, item: Any) -> torch.Tensor:
        """One item -> LongTensor [T]."""

    @abstractmethod
    def decode(self, ids: torch.Tensor) -> Any:
        """LongTensor [T] -> one item (special tokens are dropped)."""

    def types(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Type ids for a batch of sequences [B, T] -> [B, T], or None."""
        return None

    def allowed_next(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Grammar: given ids [B, t] so far, a bool mask [B, V] of allowed next tokens, or None."""
        return None

    style_rules: tuple[str, ...] = ()  # names of the rules flagged_next knows (GenerationConfig.rule_penalty keys)

    def flagged_next(self, ids: torch.Tensor, rule: str) -> torch.Tensor:
        """Style rule ``rule`` (one of :attr:`style_rules`): given ids [B, t], a bool mask [B, V] of the next
        tokens that would break it (sampling lowers their logits by ``rule_penalty[rule]`` nats)."""
        raise ValueError(f"{type(self).__name__} has no style rule {rule!r} (its rules: {self.style_rules or 'none'})")

    @abstractmethod
    def state(self) -> dict:
        """JSON-serialisable state from which ``from_state`` rebuilds the tokenizer."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict, directory: Path) -> "Tokenizer":
        """Rebuild from ``state()``; ``directory`` holds any extra files ``save_extra`` wrote."""

    def save_extra(self, directory: Path) -> None:
        """Write extra files (weights, vocabularies) next to tokenizer.json."""

    @property
    def registry_name(self) -> str:
        """The short name written to tokenizer.json (by default the one the class registered first)."""
        name = registry.name_of("tokenizer", type(self))
        if name is None:
            raise TypeError(f"{type(self).__qualname__} is not registered; decorate it with "
                            "@register_tokenizer('<modality>.<variant>') so that saved files can name it")
        return name

    # -- shared logic --------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {
            "tokenizer": self.registry_name,
            "format": TOKENIZER_FORMAT,
            "modality": self.modality,
            "vocab_size": self.vocab_size,
            "num_types": self.num_types,
            "state": self.state(),
        }
        self.save_extra(directory)
        tmp = directory / (TOKENIZER_FILE + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(directory / TOKENIZER_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        return load_tokenizer(directory)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(modality={self.modality!r}, vocab_size={self.vocab_size}, num_types={self.num_types})"


def _tokenizer_class(payload: dict, path: Path) -> type:
    """The class a tokenizer file names: a short name (format 2) or a module path (format 1)."""
    fmt = payload.get("format", 1 if "_target_" in payload else None)
    if fmt == 1:
        target = payload.get("_target_")
        name = LEGACY_TOKENIZER_TARGETS.get(target)
        if name is None and isinstance(target, str) and target.startswith("armodal.modalities."):
            registry.import_builtin_modalities()
            name = next((n for n in registry.names("tokenizer", builtins=False)
                         if _path_of(registry.get("tokenizer", n)) == target), None)
        if name is None:
            raise TokenizerFileError(f"{path}: names tokenizer class {target!r}, which is not a registered armodal "
                                     f"tokenizer (registered: {', '.join(registry.names('tokenizer'))})")
    elif fmt == TOKENIZER_FORMAT:
        name = payload.get("tokenizer")
        if not isinstance(name, str):
            raise TokenizerFileError(f"{path}: no 'tokenizer' name in a format-{fmt} tokenizer file")
    elif isinstance(fmt, int) and fmt > TOKENIZER_FORMAT:
        raise TokenizerFileError(f"{path}: tokenizer file format {fmt} was written by a newer armodal "
                                 f"(this one reads formats 1..{TOKENIZER_FORMAT}); upgrade armodal")
    else:
        raise TokenizerFileError(f"{path}: not an armodal tokenizer file (no short name, no known format)")
    try:
        cls = registry.get("tokenizer", name)
    except registry.RegistryError as e:
        raise TokenizerFileError(f"{path}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
        raise TokenizerFileError(f"{path}: {name!r} is not an armodal Tokenizer")
    return cls


def _path_of(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild a saved tokenizer from the registered class its file names (current or older format)."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved tokenizer here")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path}: not a valid armodal tokenizer file ({e})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        raise TokenizerFileError(f"{path}: not a valid armodal tokenizer file (no 'state' object)")
    return _tokenizer_class(payload, path).from_state(payload["state"], directory)


class Conditioner(nn.Module):
    """Maps a batch's ``cond`` to a continuous prefix [B, P, d_model].

    ``uncond(cond)`` returns the prefix of the same shape with the condition dropped
    (for classifier-free guidance); modalities without CFG need not implement it.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model

    def forward(self, cond: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def uncond(self, cond: Any) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no unconditional prefix (no CFG support)")


class MissingSplitError(LookupError):
    """A datamodule has no such split (e.g. no test data); the message says why.

    ``test_dataloader()`` raises it instead of handing out another split's data;
    ``armodal-eval`` reports the reason in place of the missing metrics.
    """


class Sampler(ABC):
    """Turns a loaded :class:`armodal.ar_model.ARModel` (``model``) into files (MIDI, PNG, h5ad...).

    * ``generation``: the modality's default settings, a mapping of
      :class:`~armodal.generation.GenerationConfig` fields (``modality.sampler.generation``
      in the config), kept as ``self.generation``;
    * ``__call__(model, num_samples, out_dir, config=None, **inputs)``: ``config`` is the
      settings object to use (``None``: ``self.generation``), handed on to
      ``model.generate`` untouched; ``inputs`` are the modality's own inputs (a prompt
      file, classes, a section ...), named in the class attribute ``inputs``; any other
      keyword is an error naming the sampler and what it takes;
    * it returns a JSON-serialisable summary (paths written, metrics), listing the files it
      wrote under the keys of ``OUTPUT_KINDS``.

    ``armodal-generate`` builds ``config`` as ``self.generation`` with the command line's
    settings applied, and passes its other keys as ``inputs``.
    """

    inputs: tuple[str, ...] = ()  # names of the modality inputs __call__ takes

    def __init__(self, generation: Mapping[str, Any] | GenerationConfig | None = None) -> None:
        self.generation = generation if isinstance(generation, GenerationConfig) else GenerationConfig.from_dict(
            generation, source=f"{type(self).__name__} generation defaults")

    @abstractmethod
    def __call__(self, model: Any, num_samples: int, out_dir: str | Path, config: GenerationConfig | None = None,
                 **inputs: Any) -> dict: ...

    def settings(self, config: GenerationConfig | None, inputs: Mapping[str, Any]) -> GenerationConfig:
        """Check ``inputs`` against ``self.inputs`` and return the settings to use."""
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            settings = set(GenerationConfig.field_names())
            hint = " (generation settings go in config=, not as inputs)" if settings & set(unknown) else ""
            raise TypeError(f"{type(self).__name__} got unknown input(s) {unknown}; it takes {list(self.inputs)}{hint}")
        if config is not None and not isinstance(config, GenerationConfig):
            raise TypeError(f"{type(self).__name__}: config must be a GenerationConfig, got {type(config).__name__}")
        return self.generation if config is None else config
