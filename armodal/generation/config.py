"""The one settings object for decoding: :class:`GenerationConfig`.

Every way of generating (``ARModel.generate``, ``armodal-generate``, each modality's
sampler and evaluator, the engine itself) takes this object and hands it on
unchanged; its field list below is the only place the settings are declared.
``conf/generate.yaml`` has a ``generation:`` node that is validated against it, and
``ARModel.generate(config=..., **overrides)`` applies overrides with
:meth:`GenerationConfig.replace` (``dataclasses.replace`` with a clear error for an
unknown name).

Fields that belong to one strategy (``num_beams`` ... ``lookahead_size``) default to
``None``; setting one for another strategy is an error, never silently ignored.
:meth:`GenerationConfig.value` reads them with their defaults filled in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Mapping

from armodal.generation.quantize import QUANTIZE_MODES

__all__ = ["GenerationConfig", "UnsupportedSetting", "STRATEGIES", "unsupported"]

STRATEGIES = ("sample", "greedy", "beam", "speculative", "lookahead")
_COMPILE = {"auto": "auto", "true": "true", "false": "false", True: "true", False: "false"}


@dataclass(frozen=True)
class GenerationConfig:
    strategy: str = "sample"  # sample | greedy | beam | speculative | lookahead
    temperature: float = 1.0  # softmax temperature; 0 = argmax (sample at T=0 is greedy)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens with mass >= p; 1 = off
    min_p: float = 0.0  # drop tokens whose probability is below min_p x the top one's; 0 = off
    repetition_penalty: float = 1.0  # CTRL penalty on tokens already in the sequence; 1 = off
    cfg_scale: float = 1.0  # classifier-free guidance: uncond + s * (cond - uncond); 1 = off
    max_new_tokens: int | None = None  # tokens to generate; None = the modality's length, else the room left
    constrained: bool = True  # apply the tokenizer's grammar mask (allowed next tokens)
    rule_penalty: Mapping[str, float] | None = None  # {rule: nats}: lower the logit of every token the tokenizer's
    #   style rule flags after the sequence so far (music grids: parallels, crossings) by that many nats; inf forbids
    #   it (unless every allowed token is flagged); None or {} = off.  A rule the tokenizer does not have is an error
    num_beams: int | None = None  # beam: hypotheses kept per prompt (None = 4)
    length_penalty: float | None = None  # beam: rank by sum log p / length ** length_penalty (None = 1)
    early_stopping: bool | None = None  # beam: stop once num_beams hypotheses ended (None = False: stop
    #   when no live beam can still beat the finished ones at the current length)
    draft_ckpt: str | None = None  # speculative: draft checkpoint sharing the target's tokenizer
    num_draft: int | None = None  # speculative: tokens the draft proposes per target forward (None = 4)
    lookahead_size: int | None = None  # lookahead: tokens guessed and verified per forward (None = 4)
    compile: str = "auto"  # auto | true | false: the compiled static-cache step (FastDecoder); auto = where measured faster
    quantize: str = "none"  # none | int8 | int4 | int8_dynamic: decode with a quantised copy of the weights (quantize.py)
    seed: int | None = None  # seeds the sampling generator; None = torch's global RNG

    def __post_init__(self) -> None:
        def bad(name, why):
            raise ValueError(f"generation setting {name}={getattr(self, name)!r}: {why}")

        if self.strategy not in STRATEGIES:
            bad("strategy", f"must be one of {', '.join(STRATEGIES)}")
        key = self.compile.lower() if isinstance(self.compile, str) else self.compile
        if key not in _COMPILE:
            bad("compile", "must be auto, true or false")
        object.__setattr__(self, "compile", _COMPILE[key])
        if self.quantize not in QUANTIZE_MODES:
            bad("quantize", f"must be one of {', '.join(QUANTIZE_MODES)}")
        if self.quantize == "int8_dynamic" and self.compile == "true":
            bad("quantize", "int8_dynamic runs in the eager engine only (its torch.ao modules do not compile); "
                "use compile=auto or false, or quantize=int8")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "cfg_scale", "length_penalty"):
            if getattr(self, name) is not None:
                _float(self, name)
        _int(self, "top_k", 0)
        for name, lo in (("max_new_tokens", 1), ("num_beams", 1), ("num_draft", 1), ("lookahead_size", 1)):
            if getattr(self, name) is not None:
                _int(self, name, lo)
        if self.seed is not None:
            _int(self, "seed", None)
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p < 1:
            bad("min_p", "must be in [0, 1)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 = off)")
        if not isinstance(self.constrained, bool):
            bad("constrained", "must be true or false")
        if self.rule_penalty is not None:
            if not isinstance(self.rule_penalty, Mapping):
                bad("rule_penalty", "must be a mapping {rule name: nats}, e.g. {parallels: 3}; {} = off")
            pens = {}
            for rule, v in self.rule_penalty.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                    bad("rule_penalty", f"rule {rule!r}: the penalty must be a number >= 0 (nats; inf forbids)")
                pens[str(rule)] = float(v)
            object.__setattr__(self, "rule_penalty", pens or None)  # {} switches a modality's default off
        for name, owner in _STRATEGY_FIELDS.items():
            if getattr(self, name) is not None and self.strategy != owner:
                bad(name, f"only applies to strategy={owner} (strategy is {self.strategy!r})")

    # -- reading -------------------------------------------------------------------
    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: strategy=greedy, or temperature 0 (beam ranks instead of choosing)."""
        return self.strategy == "greedy" or self.temperature == 0

    def value(self, name: str) -> Any:
        """A strategy field with its default filled in (``num_beams`` -> 4 when unset)."""
        v = getattr(self, name)
        return _DEFAULTS[name] if v is None and name in _DEFAULTS else v

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults: what a caller asked for."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}

    # -- building ------------------------------------------------------------------
    def replace(self, **overrides: Any) -> "GenerationConfig":
        """``dataclasses.replace`` with a clear error naming an unknown setting."""
        _check_names(overrides, "override")
        return dataclasses.replace(self, **overrides) if overrides else self

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None, source: str = "generation") -> "GenerationConfig":
        """Build from a mapping (a config node); ``None`` values mean "not set"."""
        values = {k: v for k, v in dict(values or {}).items() if v is not None}
        _check_names(values, source)
        return cls(**values)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


_STRATEGY_FIELDS = {
    "num_beams": "beam",
    "length_penalty": "beam",
    "early_stopping": "beam",
    "draft_ckpt": "speculative",
    "num_draft": "speculative",
    "lookahead_size": "lookahead",
}
_DEFAULTS = {"num_beams": 4, "length_penalty": 1.0, "early_stopping": False, "num_draft": 4, "lookahead_size": 4}


def _int(cfg: GenerationConfig, name: str, lo: int | None) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, float) and v.is_integer()):
        raise ValueError(f"generation setting {name}={v!r}: must be an integer")
    object.__setattr__(cfg, name, int(v))
    if lo is not None and v < lo:
        raise ValueError(f"generation setting {name}={v!r}: must be >= {lo}")


def _float(cfg: GenerationConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"generation setting {name}={v!r}: must be a number")
    object.__setattr__(cfg, name, float(v))


def _check_names(values: Mapping[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(GenerationConfig.field_names()))
    if unknown:
        raise TypeError(
            f"{source}: unknown generation setting(s) {unknown}; the settings are {', '.join(GenerationConfig.field_names())}"
        )


class UnsupportedSetting(ValueError):
    """A generation setting that a modality (or a model) cannot honour."""

    def __init__(self, setting: str, value: Any, modality: str, reason: str) -> None:
        self.setting, self.value, self.modality = setting, value, modality
        super().__init__(f"generation setting {setting}={value!r} is not supported by modality {modality!r}: {reason}")


def unsupported(config: GenerationConfig, modality: str, rules: Mapping[str, tuple[Any, str]]) -> None:
    """Raise :class:`UnsupportedSetting` for the first field whose value is not the allowed one.

    ``rules`` maps a field to ``(allowed value or a predicate, reason)``.
    """
    for name, (allowed, reason) in rules.items():
        v = getattr(config, name)
        ok = allowed(v) if callable(allowed) else v == allowed
        if not ok:
            raise UnsupportedSetting(name, v, modality, reason)
