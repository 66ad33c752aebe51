"""Short names for the parts of every modality (a timm-style registry).

Each modality registers its parts where they are defined::

    @register_tokenizer("music.jsb")
    class JSBTokenizer(Tokenizer): ...

    @register_datamodule("music.jsb")
    class JSBDataModule(pl.LightningDataModule): ...

Kinds: ``tokenizer``, ``datamodule``, ``conditioner``, ``sampler``, ``evaluator``.  Names are
``<modality>`` or ``<modality>.<variant>`` (``tokens``, ``music.remi``, ``spatial.rvq``,
``image.vq``); the part before the first dot is the modality.  The built-in modalities are
imported on first use, so ``get("tokenizer", "spatial.rvq")`` works without importing
``armodal.modalities.spatial`` first.  A modality living outside the package (a plugin, the
toy modality in ``tests/``) registers the same way from its own module; importing that
module makes its parts known.

Saved tokenizer files store the short name and a format version (see
:func:`armodal.modalities.base.load_tokenizer`), so classes can move between modules
without breaking old runs.  This module imports nothing of armodal (it sits at the bottom
of the import arrows, so ``utils.safety`` can ask :func:`is_registered_target`); modalities
use the decorators through :mod:`armodal.modalities.base`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, TypeVar

__all__ = [
    "KINDS",
    "BUILTIN_MODALITIES",
    "RegistryError",
    "register",
    "register_tokenizer",
    "register_datamodule",
    "register_conditioner",
    "register_sampler",
    "register_evaluator",
    "get",
    "build",
    "name_of",
    "names",
    "modalities",
    "import_builtin_modalities",
    "is_registered_target",
    "registered_object",
]

KINDS = ("tokenizer", "datamodule", "conditioner", "sampler", "evaluator")
BUILTIN_MODALITIES = ("tokens", "music", "image", "spatial")

T = TypeVar("T")

_TABLE: dict[str, dict[str, Any]] = {k: {} for k in KINDS}  # kind -> name -> class / factory
_PRIMARY: dict[tuple[str, int], str] = {}  # (kind, id(obj)) -> the name it was first registered under
_IMPORT_ERRORS: dict[str, str] = {}  # built-in modality -> why it could not be imported (a missing extra)


class RegistryError(LookupError):
    """An unknown or clashing short name."""


def _check_kind(kind: str) -> dict[str, Any]:
    if kind not in _TABLE:
        raise RegistryError(f"unknown registry kind {kind!r}; kinds: {', '.join(KINDS)}")
    return _TABLE[kind]


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register(kind: str, name: str, *aliases: str) -> Callable[[T], T]:
    """Class/function decorator: make ``obj`` known as ``kind`` ``name`` (and ``aliases``).

    Registering another object under a taken name is an error (re-registering the same
    object, e.g. on a module reload, is not).
    """
    table = _check_kind(kind)
    if not name or not all(part.isidentifier() for part in name.split(".")):
        raise RegistryError(f"{kind} name {name!r}: use '<modality>' or '<modality>.<variant>' (identifiers)")

    def deco(obj: T) -> T:
        for n in (name, *aliases):
            old = table.get(n)
            if old is not None and _qualname(old) != _qualname(obj):
                raise RegistryError(f"{kind} {n!r} is already registered to {_qualname(old)}; "
                                    f"cannot register {_qualname(obj)} under the same name")
            table[n] = obj
        _PRIMARY.setdefault((kind, id(obj)), name)
        return obj

    return deco


def register_tokenizer(name: str, *aliases: str):
    return register("tokenizer", name, *aliases)


def register_datamodule(name: str, *aliases: str):
    return register("datamodule", name, *aliases)


def register_conditioner(name: str, *aliases: str):
    return register("conditioner", name, *aliases)


def register_sampler(name: str, *aliases: str):
    return register("sampler", name, *aliases)


def register_evaluator(name: str, *aliases: str):
    return register("evaluator", name, *aliases)


def _import_builtin(modality: str) -> None:
    if modality not in BUILTIN_MODALITIES or modality in _IMPORT_ERRORS:
        return
    try:
        importlib.import_module(f"armodal.modalities.{modality}")
    except ImportError as e:  # a modality whose optional dependencies are not installed
        _IMPORT_ERRORS[modality] = f"{type(e).__name__}: {e}"


def import_builtin_modalities() -> dict[str, str]:
    """Import every built-in modality package (registering its parts); returns those that failed, with why."""
    for m in BUILTIN_MODALITIES:
        _import_builtin(m)
    return dict(_IMPORT_ERRORS)


def get(kind: str, name: str) -> Any:
    """The class (or factory) registered as ``kind`` ``name``; imports a built-in modality on first use."""
    table = _check_kind(kind)
    if name not in table:
        _import_builtin(name.split(".", 1)[0])
    if name not in table:
        modality = name.split(".", 1)[0]
        why = ""
        if modality in _IMPORT_ERRORS:
            why = (f"; the {modality} modality could not be imported ({_IMPORT_ERRORS[modality]}): "
                   f"install its extra, pip install 'armodal[{modality}]'")
        raise RegistryError(f"no {kind} registered as {name!r}{why}; registered: {', '.join(names(kind)) or 'none'}")
    return table[name]


def build(kind: str, name: str, /, **kwargs: Any) -> Any:
    """Instantiate the part registered as ``kind`` ``name`` with ``kwargs``."""
    return get(kind, name)(**kwargs)


def name_of(kind: str, obj: Any) -> str | None:
    """The name a class (or an instance's class) was first registered under, or None."""
    _check_kind(kind)
    for candidate in (obj, type(obj)):
        got = _PRIMARY.get((kind, id(candidate)))
        if got is not None:
            return got
    return None


def names(kind: str, modality: str | None = None, builtins: bool = True) -> list[str]:
    """Registered names of one kind (every built-in modality imported first unless ``builtins=False``)."""
    table = _check_kind(kind)
    if builtins:
        import_builtin_modalities()
    return sorted(n for n in table if modality is None or n.split(".", 1)[0] == modality)


def modalities(builtins: bool = True) -> list[str]:
    """Every modality with at least one registered part."""
    if builtins:
        import_builtin_modalities()
    return sorted({n.split(".", 1)[0] for table in _TABLE.values() for n in table})


def registered_object(target: Any) -> Any | None:
    """The registered part a dotted ``_target_`` names (None if it names none), without importing anything.

    The path is followed only through modules already imported (``sys.modules``) and their
    attributes, so a saved config cannot make this import code; a plugin's parts count once
    the plugin has been imported (and has thereby registered them).  Both the defining path
    (``pkg.data.ToyDataModule``) and a re-export (``pkg.ToyDataModule``) are accepted.
    """
    if not isinstance(target, str) or not target:
        return None
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[i:]:
            if attr.startswith("__"):
                return None
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj if any(id(obj) == key[1] for key in _PRIMARY) else None
    return None


def is_registered_target(target: Any) -> bool:
    """Whether a dotted ``_target_`` names a registered part (see :func:`registered_object`)."""
    return registered_object(target) is not None
