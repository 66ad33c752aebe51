"""Guards for rebuilding objects from saved configs, checkpoints and tokenizer files.

A saved config (a checkpoint's ``armodal`` metadata, an exported ``config.yaml``, a
``tokenizer.json``) is data someone else may have written.  Before anything in it is
instantiated:

* every ``_target_`` is located step by step (:func:`locate_target`): each step of the
  dotted path must be an armodal module or a class defined in armodal, and the object it
  names must be a class defined in armodal or a function registered with
  :func:`constructible`.  ``armodal.x.os.system`` or ``armodal.x.torch.load`` stop at
  the first hop out of armodal; nothing is called while locating;
* interpolations are checked before they are resolved: a saved config may only refer to
  its own nodes (``${model.d_model}``); a resolver (``${oc.decode:...}``,
  ``${oc.env:...}``, any registered resolver) could build new ``_target_`` nodes or run
  code, so it is refused.  The targets are checked on the resolved values, so
  ``_target_: armodal.${hop}`` is seen as what it resolves to;
* ``_args_``, ``_partial_`` and nested lists/dicts are walked the same way.

Every refusal names the file and the config key.  :func:`check_config_types` checks the
values given to a target against its signature (``int``, ``Literal[...]`` choices ...)
so that a typo fails before any side effect.
"""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "UnsafeTargetError",
    "ConfigValueError",
    "constructible",
    "locate_target",
    "check_target",
    "check_config_targets",
    "safe_config",
    "check_config_types",
    "check_choice",
    "load_npz_arrays",
]

ROOT_PACKAGE = "armodal"
_MARK = "__armodal_constructible__"


class UnsafeTargetError(ValueError):
    """A saved config names something that may not be rebuilt from a file."""


class ConfigValueError(ValueError):
    """A config value has the wrong type or is not one of the allowed choices."""


def constructible(fn: Callable) -> Callable:
    """Register a factory function as buildable from a config ``_target_``.

    Classes defined in armodal are constructible as they are; functions must opt in
    (most armodal functions read or write files and are not meant to be config targets).
    """
    setattr(fn, _MARK, True)
    return fn


def _in_armodal(name: str | None) -> bool:
    return isinstance(name, str) and (name == ROOT_PACKAGE or name.startswith(ROOT_PACKAGE + "."))


def _where(source: str, key: str) -> str:
    return f"{source}: key {key or '<root>'}"


def locate_target(target: Any, source: str = "config", key: str = "_target_") -> Any:
    """Resolve a dotted ``_target_`` without leaving armodal; raise :class:`UnsafeTargetError` otherwise.

    Mirrors Hydra's lookup (attribute first, then submodule import) but checks every
    step: a module must be part of armodal, any other intermediate object must be a class
    defined in armodal, and the result must be a class defined in armodal or a
    :func:`constructible` function.  Only armodal's own modules are ever imported.  A part
    registered in :mod:`armodal.utils.registry` (e.g. a plugin modality the user imported) is
    accepted wherever it lives; it is looked up through already-imported modules only.
    """

    from armodal.utils.registry import registered_object

    def refuse(why: str) -> UnsafeTargetError:
        return UnsafeTargetError(f"{_where(source, key)}: refusing _target_={target!r}: {why}")

    if not isinstance(target, str):
        raise refuse("a target must be a dotted name string")
    registered = registered_object(target)  # a registered modality part (a plugin the user imported)
    if registered is not None:
        return registered
    parts = target.split(".")
    if parts[0] != ROOT_PACKAGE or len(parts) < 2:
        raise refuse(f"only names defined in the {ROOT_PACKAGE} package or registered modality parts can be "
                     "rebuilt from a saved file")
    for part in parts[1:]:
        if not part.isidentifier() or part.startswith("__"):
            raise refuse(f"{part!r} is not an allowed name step")
    obj: Any = importlib.import_module(ROOT_PACKAGE)
    for i, part in enumerate(parts[1:], start=1):
        here = ".".join(parts[: i + 1])
        if isinstance(obj, types.ModuleType):
            if part in vars(obj):
                nxt = vars(obj)[part]
            else:
                try:
                    nxt = importlib.import_module(here)
                except ImportError:
                    raise refuse(f"{here} does not exist") from None
        elif isinstance(obj, type):
            nxt = inspect.getattr_static(obj, part, None)
            if nxt is None:
                raise refuse(f"{here} does not exist")
        else:  # pragma: no cover - the checks below stop before a non-module, non-class step
            raise refuse(f"{'.'.join(parts[:i])} is not a module or class")
        if isinstance(nxt, types.ModuleType):
            if not _in_armodal(nxt.__name__):
                raise refuse(f"the path passes through the non-armodal module {nxt.__name__!r} (at {here})")
        elif isinstance(nxt, type):
            if not _in_armodal(getattr(nxt, "__module__", None)):
                raise refuse(f"{here} is {nxt.__module__}.{nxt.__qualname__}, which is not defined in armodal")
        elif i < len(parts) - 1:
            raise refuse(f"{here} is not an armodal module or class (a {type(nxt).__name__})")
        obj = nxt
    if isinstance(obj, type):
        return obj
    if isinstance(obj, types.FunctionType) and _in_armodal(obj.__module__) and getattr(obj, _MARK, False):
        return obj
    if isinstance(obj, types.ModuleType):
        raise refuse("a module is not constructible")
    raise refuse(
        "only armodal classes and functions registered with @armodal.utils.safety.constructible "
        f"can be config targets ({target} is a {type(obj).__name__})"
    )


def check_target(target: Any, source: str = "config", key: str = "_target_") -> Any:
    """Alias of :func:`locate_target` (returns the located class or factory)."""
    return locate_target(target, source, key)


# -- interpolations ---------------------------------------------------------------------
def _resolvers_in(value: str) -> list[str]:
    """Names of resolvers an OmegaConf string would call (empty: plain text or node references)."""
    from omegaconf import grammar_parser
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as P

    tree = grammar_parser.parse(value, parser_rule="text")
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, P.InterpolationResolverContext):
            found.append(node.resolverName().getText())
        for child in getattr(node, "children", None) or []:
            walk(child)

    walk(tree)
    return found


def _check_interpolations(node: Any, source: str, key: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _check_interpolations(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _check_interpolations(v, source, f"{key}[{i}]")
    elif isinstance(node, str) and "${" in node:
        try:
            names = _resolvers_in(node)
        except Exception as e:  # noqa: BLE001 - GrammarParseError and friends
            raise UnsafeTargetError(f"{_where(source, key)}: unreadable interpolation {node!r} ({e})") from None
        if names:
            raise UnsafeTargetError(
                f"{_where(source, key)}: refusing interpolation {node!r}: a saved config may only refer to its "
                f"own keys; resolvers ({', '.join(sorted(set(names)))}) are not evaluated from a file"
            )


def _walk_targets(node: Any, source: str, key: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            here = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                locate_target(v, source, here)
            else:
                _walk_targets(v, source, here)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _walk_targets(v, source, f"{key}[{i}]")


def safe_config(cfg: Any, source: str = "config", trusted: bool = False):
    """Check a config for unsafe targets and interpolations; return it resolved as a ``DictConfig``.

    ``trusted=False`` (a file someone else may have written): resolvers are refused and
    only references to the config's own keys are resolved.  ``trusted=True`` (the
    config the user composed for this run): resolvers are evaluated, targets still checked.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(cfg, (DictConfig, ListConfig)):
        raw = OmegaConf.to_container(cfg, resolve=False)
    else:
        raw = cfg
    if not trusted:
        _check_interpolations(raw, source, "")
    try:
        node = OmegaConf.create(raw)
        resolved = OmegaConf.to_container(node, resolve=True)
    except Exception as e:  # noqa: BLE001 - dangling reference, cycle, bad value
        msg = " ".join(str(e).split())[:300]
        raise UnsafeTargetError(f"{source}: the config cannot be resolved ({type(e).__name__}: {msg})") from None
    _walk_targets(resolved, source, "")
    return OmegaConf.create(resolved)


def check_config_targets(cfg: Any, source: str = "config", trusted: bool = False) -> None:
    """Refuse a config with a target outside armodal, or (untrusted) with a resolver interpolation."""
    safe_config(cfg, source, trusted)


# -- typed values -------------------------------------------------------------------------
_PRIMITIVE = (bool, int, float, str, type(None))


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _mismatch(value: Any, hint: Any) -> bool:
    """True only when ``value`` certainly does not fit ``hint`` (unknown hints never mismatch)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return False
    if isinstance(value, dict) and "_target_" in value:
        return False  # built by instantiate; checked on its own
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value not in typing.get_args(hint) or any(
            type(value) is bool and type(a) is not bool and value == a for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return all(_mismatch(value, a) for a in typing.get_args(hint))
    if origin is not None:
        hint = origin
    if hint is type(None):
        return value is not None
    if hint is bool:
        return not isinstance(value, bool)
    if hint is int:  # an integral float (YAML 1e5) is accepted
        return isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if hint is float:
        return isinstance(value, bool) or not isinstance(value, (int, float))
    if hint is str:
        return not isinstance(value, str)
    if hint in (list, tuple, typing.Sequence, typing.Iterable, typing.Collection) or (
            isinstance(hint, type) and hint.__module__ == "collections.abc" and hint.__name__ in ("Sequence", "Iterable")):
        return isinstance(value, (bool, int, float, dict)) or value is None
    if hint is dict or hint is typing.Mapping:
        return isinstance(value, (bool, int, float, str, list)) or value is None
    if hint is Path:
        return not isinstance(value, (str, Path))
    return False  # some other class: a string or mapping may well be converted; do not guess


def _hints(fn: Callable) -> tuple[inspect.Signature, dict] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(fn.__init__ if isinstance(fn, type) else fn)
    except Exception:  # noqa: BLE001 - unresolvable forward references: no type check
        hints = {}
    return sig, hints


def check_kwargs(fn: Callable, values: dict, source: str, key: str, what: str) -> None:
    """Check config ``values`` against ``fn``'s signature: unknown keys, wrong types, bad choices."""
    got = _hints(fn)
    if got is None:
        return
    sig, hints = got
    params = sig.parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, value in values.items():
        if not isinstance(name, str) or name.startswith("_"):
            continue
        here = f"{key}.{name}" if key else name
        if name not in params or params[name].kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            if not has_var_kw:
                raise ConfigValueError(f"{source}: {here} is not a parameter of {what}")
            continue
        hint = hints.get(name, params[name].annotation)
        if isinstance(hint, str):
            continue  # an unresolved forward reference
        if _mismatch(value, hint):
            raise ConfigValueError(f"{source}: {here}={value!r} is not valid for {what}: expected {_describe(hint)}")


def check_config_types(cfg: Any, source: str = "config", extra: dict[str, Callable] | None = None) -> None:
    """Check every ``_target_`` node's values against the target's signature, before anything runs.

    ``extra`` maps config keys without a ``_target_`` to the callable they feed (e.g.
    ``{"trainer": pytorch_lightning.Trainer}``).  Only certain mismatches are reported:
    a string where an ``int`` is declared, a value outside a ``Literal[...]``, an unknown key.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                fn = locate_target(node["_target_"], source, f"{key}._target_" if key else "_target_")
                check_kwargs(fn, node, source, key, node["_target_"])
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")

    for k, fn in (extra or {}).items():
        if isinstance(data, dict) and isinstance(data.get(k), dict):
            check_kwargs(fn, data[k], source, k, getattr(fn, "__qualname__", str(fn)))
    walk(data, "")


def check_choice(name: str, value: Any, choices: typing.Iterable[Any], owner: str = "") -> Any:
    """Return ``value`` if it is one of ``choices``; otherwise a :class:`ConfigValueError` naming them."""
    choices = tuple(choices)
    if value not in choices:
        where = f"{owner}: " if owner else ""
        raise ConfigValueError(f"{where}{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")
    return value


# -- arrays without pickle ---------------------------------------------------------------
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct")}


def _numpy_only_unpickler(fp, source: str, encoding: str):
    """An unpickler for nested NumPy arrays (an object array of arrays) that refuses every other global."""
    import pickle

    import numpy as np

    class NumpyOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in _NUMPY_GLOBALS:
                raise UnsafeTargetError(f"{source}: refusing to unpickle {module}.{name}; only NumPy arrays are "
                                        "read from this file")
            if name == "_reconstruct":
                try:
                    from numpy._core.multiarray import _reconstruct
                except ImportError:  # pragma: no cover - NumPy 1.x
                    from numpy.core.multiarray import _reconstruct
                return _reconstruct
            return getattr(np, name)

    return NumpyOnly(fp, encoding=encoding)


def load_npz_arrays(path: str | Path, encoding: str = "latin1") -> dict:
    """Read every array of an ``.npz`` like ``np.load(..., allow_pickle=True)`` would, except that an
    object array (e.g. a list of variable-length arrays) is unpickled with only NumPy's own array
    classes allowed: a file that carries any other object is refused instead of run."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npformat

    out = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if not member.endswith(".npy"):
                continue
            with z.open(member) as f:
                version = npformat.read_magic(f)
                read = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
                shape, fortran, dtype = read(f)
                if not dtype.hasobject:
                    f.seek(0)
                    arr = npformat.read_array(f, allow_pickle=False)
                else:
                    arr = _numpy_only_unpickler(f, f"{path}:{member}", encoding).load()
                    if not isinstance(arr, np.ndarray):
                        raise UnsafeTargetError(f"{path}:{member}: not an array")
            out[member[:-4]] = arr
    return out
