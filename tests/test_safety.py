"""Hostile saved configs and tokenizer files: each is refused, naming the file and the key, and nothing runs.

Every corpus entry would write a marker file if it were instantiated; the tests load
it through armodal's entry points and check that no marker appears.
``test_hostile_corpus_is_live`` instantiates the executable entries WITHOUT the check
and sees the marker, so the corpus cannot silently turn harmless.
"""

from __future__ import annotations

import importlib
import json
import re
import os
import shlex
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import armodal
from armodal.utils.safety import ConfigValueError, UnsafeTargetError, check_config_types, locate_target, safe_config


def _hop(module: str, attr: str) -> str:
    """A dotted path that steps out of armodal through a module armodal imports (asserted to exist)."""
    mod = importlib.import_module(module)
    assert isinstance(getattr(mod, attr, None), types.ModuleType), f"{module} no longer imports {attr}; pick another hop"
    return f"{module}.{attr}"


OS_HOP = _hop("armodal.utils.config", "os")
TORCH_HOP = _hop("armodal.training.checkpoint", "torch")


class _Payload:
    """Pickled into a file the hostile ``torch.load`` target points at."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _corpus(marker: Path, payload: Path) -> dict[str, tuple[dict, str]]:
    """name -> (config tree placed at ``modality.sampler``, the key the refusal must name)."""
    touch = f"touch {shlex.quote(str(marker))}"
    system = {"_target_": f"{OS_HOP}.system", "_args_": [touch]}  # Hydra 1.3.8 block-lists os.system itself
    load = {"_target_": f"{TORCH_HOP}.load", "f": str(payload), "weights_only": False}  # not block-listed
    s = "modality.sampler"
    return {
        "module_hop_os_system": (system, f"{s}._target_"),
        "module_hop_torch_load": (load, f"{s}._target_"),
        "not_armodal": ({"_target_": "os.system", "_args_": [touch]}, f"{s}._target_"),
        "builtins_exec": ({"_target_": "builtins.exec", "_args_": [f"open({str(marker)!r}, 'w')"]}, f"{s}._target_"),
        "dunder_step": ({"_target_": "armodal.utils.config.__builtins__.exec"}, f"{s}._target_"),
        "foreign_class_hop": ({"_target_": "armodal.utils.config.Path.touch", "_args_": [str(marker)]},
                              f"{s}._target_"),
        "armodal_function_not_registered": ({"_target_": "armodal.training.checkpoint.atomic_torch_save",
                                             "obj": {}, "path": str(marker)}, f"{s}._target_"),
        "partial": ({"_target_": f"{OS_HOP}.system", "_partial_": True}, f"{s}._target_"),
        "args_nested": ({"_target_": "armodal.models.build_transformer", "_args_": [load]},
                        f"{s}._args_[0]._target_"),
        "nested_lists": ({"_target_": "armodal.modalities.tokens.TokensSampler", "extra": [[{"x": [system]}]]},
                         f"{s}.extra[0][0].x[0]._target_"),
        "interpolated_target": ({**load, "_target_": "armodal.${modality.hop}"}, f"{s}._target_"),
        "interpolated_node": ({"_target_": "armodal.modalities.tokens.TokensSampler", "x": "${modality.evil}"},
                              f"{s}.x._target_"),
        "resolver_decode": ("${oc.decode:'{_target_: " + TORCH_HOP + ".load, f: " + str(payload) + ", weights_only: false}'}",
                            s),
        "resolver_env": ({"_target_": "${oc.env:ARMODAL_TEST_EVIL,os.system}", "_args_": [touch]}, f"{s}._target_"),
        "resolver_create": ({"_target_": "armodal.modalities.tokens.TokensSampler",
                             "x": "${oc.create:{_target_: os.system}}"}, f"{s}.x"),
        "target_not_a_string": ({"_target_": {"_target_": "os.system"}}, f"{s}._target_"),
        "target_bad_syntax": ({"_target_": "armodal.utils.config:os.system"}, f"{s}._target_"),
    }


# entries that run code if instantiated without armodal's check (os.system / exec are refused by
# armodal too, but Hydra 1.3.8's own block-list also stops them, so they are not "live" here)
LIVE = ["module_hop_torch_load", "foreign_class_hop",
        "armodal_function_not_registered", "args_nested", "interpolated_target", "resolver_decode"]
CORPUS_NAMES = list(_corpus(Path("m"), Path("p")))


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "MARKER"
    payload = tmp_path / "payload.pt"
    torch.save({"x": _Payload(marker)}, payload)
    assert not marker.exists()
    return marker, _corpus(marker, payload)


def _place(name: str, node) -> dict:
    """A small saved config with ``node`` as its sampler."""
    cfg = {
        "name": "tokens",
        "module": {"_target_": "armodal.training.ARLitModule"},
        "model": {"_target_": "armodal.models.build_transformer", "d_model": 32},
        "modality": {"name": "tokens", "sampler": node},
    }
    if name == "interpolated_target":  # the target string is assembled from another key
        cfg["modality"]["hop"] = TORCH_HOP.removeprefix("armodal.") + ".load"
    if name == "interpolated_node":  # the hostile dict sits elsewhere and is pulled in by interpolation
        cfg["modality"]["evil"] = {"_target_": f"{OS_HOP}.system", "_args_": ["true"]}
    return cfg


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_hostile_config_is_refused_naming_file_and_key(name, hostile):
    marker, corpus = hostile
    node, key = corpus[name]
    with pytest.raises(UnsafeTargetError) as e:
        safe_config(_place(name, node), source="evil/config.yaml")
    msg = str(e.value)
    assert msg.startswith("evil/config.yaml: key ") and f"key {key}" in msg, msg
    assert not marker.exists()


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_hostile_checkpoint_is_refused_by_load_and_runs_nothing(name, hostile, tmp_path):
    marker, corpus = hostile
    node, key = corpus[name]
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "armodal": {"config": _place(name, node), "modality": "tokens"}}, ckpt)
    with pytest.raises(UnsafeTargetError, match=re.escape(f"{ckpt}: key {key}")):
        armodal.load(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize("entry", ["generate", "eval"])
def test_hostile_checkpoint_is_refused_by_the_cli_entry_points(entry, hostile, tmp_path):
    from tests.conftest import compose_cfg

    marker, corpus = hostile
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "armodal": {"config": _place("module_hop_os_system", corpus["module_hop_os_system"][0]),
                                              "modality": "tokens"}}, ckpt)
    fn = importlib.import_module(f"armodal.{entry}")
    fn = fn.generate if entry == "generate" else fn.evaluate
    with pytest.raises(UnsafeTargetError, match=f"{ckpt}: key modality.sampler._target_"):
        fn(compose_cfg(entry, [f"ckpt={ckpt}"]))
    assert not marker.exists()


@pytest.mark.parametrize("name", LIVE)
def test_hostile_corpus_is_live(name, hostile):
    """Without the check, Hydra would run these: the corpus really is hostile."""
    from hydra.utils import instantiate

    marker, corpus = hostile
    cfg = OmegaConf.create(_place(name, corpus[name][0]))
    try:
        instantiate(cfg.modality.sampler)
    except Exception:  # noqa: BLE001 - some fail after the damage is done
        pass
    assert marker.exists(), f"{name} no longer executes anything when unchecked"


def test_hostile_tokenizer_file_is_refused(hostile, tmp_path):
    from armodal.modalities.base import load_tokenizer

    marker, _ = hostile
    for target in (f"{OS_HOP}.system", f"{TORCH_HOP}.load", "armodal.training.ARLitModule"):
        d = tmp_path / target.replace(".", "_")
        d.mkdir()
        (d / "tokenizer.json").write_text(json.dumps({"_target_": target, "state": {"f": str(marker)}}))
        with pytest.raises((UnsafeTargetError, ValueError), match=str(d / "tokenizer.json")):
            load_tokenizer(d)
    assert not marker.exists()


def test_every_shipped_config_target_is_constructible():
    """Every ``_target_`` in conf/ passes the check (a new factory needs @constructible)."""
    from armodal.utils.config import CONF_DIR

    targets = set()
    for f in Path(CONF_DIR).rglob("*.yaml"):
        for line in f.read_text().splitlines():
            if line.strip().startswith("_target_:"):
                targets.add((f.name, line.split(":", 1)[1].split("#")[0].strip()))
    assert len(targets) > 20
    for fname, t in sorted(targets):
        locate_target(t, fname)


def test_saved_config_may_refer_to_its_own_keys():
    cfg = safe_config({"a": {"d": 8}, "model": {"_target_": "armodal.models.build_transformer", "d_model": "${a.d}"}},
                      "ok.yaml")
    assert cfg.model.d_model == 8


def test_typed_override_is_checked_against_the_signature():
    import pytorch_lightning as pl

    with pytest.raises(ConfigValueError, match=r"cfg: trainer.max_steps='abc' is not valid for Trainer: expected int"):
        check_config_types({"trainer": {"max_steps": "abc"}}, "cfg", {"trainer": pl.Trainer})
    with pytest.raises(ConfigValueError, match=r"module.optimizer.lr='fast'.*expected float"):
        check_config_types({"module": {"optimizer": {"_target_": "armodal.training.optim.adamw", "_partial_": True,
                                                     "lr": "fast"}}}, "cfg")
    with pytest.raises(ConfigValueError, match=r"module.optimizer.lrr is not a parameter"):
        check_config_types({"module": {"optimizer": {"_target_": "armodal.training.optim.adamw", "lrr": 1.0}}}, "cfg")
    check_config_types({"trainer": {"max_steps": 10, "precision": "bf16-mixed", "val_check_interval": 0.5}}, "cfg",
                       {"trainer": pl.Trainer})


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_hostile_export_config_is_refused_and_runs_nothing(name, hostile, tmp_path):
    """An exported folder whose config.yaml is hostile (its manifest hash updated to match)."""
    from armodal.training.checkpoint import file_hashes

    marker, corpus = hostile
    node, key = corpus[name]
    out = tmp_path / "export"
    (out / "tokenizer").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"")
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(_place(name, node))))
    manifest = {"format": "armodal-pretrained", "format_version": 1, "modality": "tokens", "weights": {"tied": {}},
                "files": file_hashes(out)}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsafeTargetError, match=re.escape(f"{out / 'config.yaml'}: key {key}")):
        armodal.load(out)
    assert not marker.exists()
