"""The modality contract, parametrized over the registry (timm / MidiTok style).

Every part registered in :mod:`armodal.utils.registry` -- the built-in modalities and any other
(the toy modality of ``tests/toy_modality`` registers itself from there) -- runs the same tests:

* tokenizers: ids in range, ``decode(encode(x))`` equals what the tokenizer can represent, the
  grammar allows the tokenizer's own sequences, save/load by short name gives the same tokenizer;
* datamodules: batch keys, dtypes and shapes;
* each experiment: a smoke ``train`` -> ``generate`` (the sampler writes the files it declares and
  returns its summary) -> ``eval`` (NLL plus the evaluator's metrics, numbers) on synthetic data.

How to make small examples of a modality's parts comes from its kit (``tests/**/kit_<modality>.py``,
see ``tests/kits/README.md``); a registered part no kit covers fails.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from armodal.modalities.base import OUTPUT_KINDS, TOKENIZER_FILE, TOKENIZER_FORMAT, load_tokenizer
from armodal.utils import registry
from armodal.utils.config import CONF_DIR
from tests.conftest import SHRINK, compose_cfg

TESTS = Path(__file__).resolve().parent


def _load_kits() -> dict:
    kits = {}
    for path in sorted(TESTS.rglob("kit_*.py")):
        module = importlib.import_module(".".join(("tests", *path.relative_to(TESTS).with_suffix("").parts)))
        kits[module.MODALITY] = module
    return kits


KITS = _load_kits()  # importing a kit imports (and so registers) its modality
IMPORT_ERRORS = registry.import_builtin_modalities()
EXPERIMENTS = sorted((e, m) for m, kit in KITS.items() for e in kit.EXPERIMENTS)


def _kit(name: str):
    modality = name.split(".", 1)[0]
    if modality not in KITS:
        pytest.fail(f"{name!r} is registered but no tests/**/kit_{modality}.py covers the {modality} modality")
    return KITS[modality]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _numbers(d, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics dict, keyed ``a/b``."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


# ----------------------------------------------------------------------------- coverage
def test_builtin_modalities_import():
    assert not IMPORT_ERRORS, f"built-in modalities failed to import: {IMPORT_ERRORS}"
    assert {"tokens", "music", "image", "spatial", "toy"} <= set(registry.modalities())


def test_every_registered_part_is_covered(tmp_path):
    """Each registered tokenizer / datamodule has a kit example; each sampler, evaluator and
    conditioner is the one of some experiment the smoke test runs; every experiment has a kit."""
    used = {k: set() for k in ("sampler", "evaluator", "conditioner")}
    for experiment, modality in EXPERIMENTS:
        search = [f"hydra.searchpath=[file://{KITS[modality].CONFIG_DIR}]"] if hasattr(KITS[modality], "CONFIG_DIR") else []
        cfg = compose_cfg("train", [f"experiment={experiment}", *search], tmp_path)
        assert cfg.modality.name == modality, f"{experiment} is listed by kit_{modality} but uses {cfg.modality.name}"
        for kind in used:
            node = cfg.modality.get(kind)
            if node is not None:
                module, _, attr = node._target_.rpartition(".")
                name = registry.name_of(kind, getattr(importlib.import_module(module), attr))
                assert name is not None, f"{experiment}: modality.{kind} {node._target_} is not registered as a {kind}"
                used[kind].add(name)
    problems = []
    for kind in ("tokenizer", "datamodule"):
        for name in registry.names(kind):
            kit = KITS.get(name.split(".", 1)[0])
            if kit is None or name not in getattr(kit, kind + "s")(tmp_path / kind / name):
                problems.append(f"{kind} {name!r} has no example in its kit")
    for kind, seen in used.items():
        problems += [f"{kind} {n!r} is in no smoke-tested experiment" for n in registry.names(kind) if n not in seen]
    listed = {e for e, _ in EXPERIMENTS}
    problems += [f"conf/experiment/{p.name} is in no kit's EXPERIMENTS" for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))
                 if p.stem not in listed]
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("name", registry.names("tokenizer"))
def test_tokenizer_round_trip_and_save_load(name, tmp_path):
    kit = _kit(name)
    tok, items = kit.tokenizers(tmp_path)[name]
    assert registry.get("tokenizer", name) is type(tok) and tok.modality == kit.MODALITY
    representable = getattr(kit, "representable", lambda t, x: x)
    same = getattr(kit, "same", _same)
    encoded = []
    for item in items:
        ids = tok.encode(item)
        assert ids.dtype == torch.long and ids.dim() == 1
        assert ids.numel() == 0 or (0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size)
        assert same(tok.decode(ids), representable(tok, item)), f"{name}: decode(encode(x)) differs for {item!r}"
        if tok.num_types and ids.numel():
            types = tok.types(ids[None])
            assert types.shape == (1, ids.numel()) and int(types.max()) < tok.num_types and int(types.min()) >= 0
        start = 1 if ids.numel() and ids[0] == tok.bos_id else 0
        for k in range(start, ids.numel()):  # the grammar allows the tokenizer's own sequences
            allowed = tok.allowed_next(ids[None, :k])
            if allowed is not None:
                assert allowed.shape == (1, tok.vocab_size) and bool(allowed[0, ids[k]]), f"{name}: token {k} refused"
        encoded.append(ids)

    tok.save(tmp_path / "tok")
    payload = json.loads((tmp_path / "tok" / TOKENIZER_FILE).read_text())
    assert payload["tokenizer"] == tok.registry_name and payload["format"] == TOKENIZER_FORMAT
    assert registry.get("tokenizer", payload["tokenizer"]) is type(tok)
    back = load_tokenizer(tmp_path / "tok")
    assert type(back) is type(tok) and (back.vocab_size, back.num_types) == (tok.vocab_size, tok.num_types)
    assert (back.pad_id, back.bos_id, back.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    for item, ids in zip(items, encoded):
        assert torch.equal(back.encode(item), ids) and same(back.decode(ids), tok.decode(ids))


# ----------------------------------------------------------------------------- datamodules
@pytest.mark.parametrize("name", registry.names("datamodule"))
def test_datamodule_batches(name, tmp_path):
    kit = _kit(name)
    dm = kit.datamodules(tmp_path)[name]
    assert registry.get("datamodule", name) is type(dm)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        batch = next(iter(loader))
        assert isinstance(batch, dict), f"{name}: batches must be dicts, got {type(batch).__name__}"
        if tok is None:  # a non-AR stage (e.g. pixels for the VQ tokenizer): tensors sharing the batch size
            assert len({v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor)}) == 1
            continue
        assert registry.name_of("tokenizer", tok) is not None, f"{name}: its tokenizer {type(tok).__name__} is not registered"
        assert set(batch) <= {"ids", "types", "cond", "loss_mask"}, f"{name}: unknown batch keys {set(batch)}"
        ids = batch["ids"]
        assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] > 0
        assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
        if batch.get("types") is not None:
            assert tok.num_types > 0 and batch["types"].shape == ids.shape and int(batch["types"].max()) < tok.num_types
        if batch.get("loss_mask") is not None:
            mask = batch["loss_mask"]
            assert mask.dtype == torch.bool and mask.shape == ids.shape and bool(mask.any())
        if batch.get("cond") is not None:
            cond = batch["cond"]
            first = next(iter(cond.values())) if isinstance(cond, dict) else cond
            assert first.shape[0] == ids.shape[0]


# ----------------------------------------------------------------------------- experiments
@pytest.mark.parametrize("experiment,modality", EXPERIMENTS)
def test_experiment_smoke_train_generate_eval(experiment, modality, tmp_path, monkeypatch):
    from armodal.api import load
    from armodal.eval import evaluate
    from armodal.generate import generate
    from armodal.train import train

    kit = KITS[modality]
    monkeypatch.setenv("ARMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ARMODAL_RUNS", str(tmp_path / "runs"))
    search = [f"hydra.searchpath=[file://{kit.CONFIG_DIR}]"] if hasattr(kit, "CONFIG_DIR") else []
    run = tmp_path / "run"
    overrides = [f"experiment={experiment}", *SHRINK, "logger=csv", f"run_dir={run}", *search,
                 *kit.experiments(tmp_path)[experiment]]
    cfg = compose_cfg("train", overrides, tmp_path)
    train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    if cfg.get("model") is not None:  # the AR stage: load, sample
        model = load(ckpt)
        assert model.modality == modality
        out = tmp_path / "gen"
        summary = generate(compose_cfg("generate", [f"ckpt={ckpt}", "num_samples=2", f"out_dir={out}"]))
        declared = [p for kind in OUTPUT_KINDS for p in summary.get(kind) or []]
        assert declared, f"{experiment}: the sampler declared no output files ({sorted(summary)})"
        for p in declared:
            assert Path(p).is_file() and Path(p).stat().st_size > 0, p
        assert json.loads((out / "summary.json").read_text())["out_dir"] == str(out)
        if cfg.callbacks.get("samples") is not None and cfg.callbacks.samples.get("enabled", True):
            logged = (run / "samples" / "samples.csv").read_text().splitlines()[1:]  # step,kind,path
            assert logged and all(Path(row.split(",", 2)[2]).is_file() for row in logged)
    metrics = evaluate(compose_cfg("eval", [f"ckpt={ckpt}", f"out={tmp_path / 'eval' / 'metrics.json'}", "num_samples=2"]))
    if cfg.get("model") is not None:
        assert math.isfinite(metrics["val"]["nll"]) and metrics["val"]["tokens"] > 0
    if cfg.modality.get("evaluator") is not None:
        numbers = {k: v for k, v in _numbers(metrics).items() if not k.startswith(("val/", "test/"))}
        assert numbers, f"{experiment}: the evaluator returned no numeric metric"
        bad = {k: v for k, v in numbers.items() if math.isinf(v)}
        assert not bad, f"{experiment}: infinite metrics {bad}"
