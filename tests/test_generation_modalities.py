"""Every strategy and every generation setting, on a tiny trained checkpoint of every modality.

One checkpoint per AR experiment of the contract kits (``tests/**/kit_<modality>.py``: the built-in
modalities and the toy one), trained by ``armodal-train`` for a few dozen steps on the kit's synthetic
data.  On each:

* **greedy equivalence** -- ``sample`` at temperature 0, ``beam`` with one beam, ``speculative`` with
  the checkpoint as its own draft (``draft_ckpt=``; not spatial, whose window decoder refuses it by
  name) and ``lookahead`` (n = 1 and 3) give the same tokens through ``ARModel.generate`` (spatial:
  through its window decoder), with the static-cache step off and on (``compile=true``; the default
  suite runs that step uncompiled, ``-m slow`` compiles it);
* **the settings contract** -- the modality's sampler, with each field of :class:`GenerationConfig`
  set (each strategy through ``armodal-generate ckpt=... strategy=...`` itself), either raises
  :class:`UnsupportedSetting` naming that field (or the strategy the field belongs to) and the modality, or the value reaches every
  decode engine it runs and its output changes -- the files it writes or the ids the engines return
  (the kits' image VQ is untrained, so its pictures may not show a change of codes) -- or stays
  seeded-identical where it must (``compile``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from armodal.generation import GenerationConfig, UnsupportedSetting
from armodal.generation.engine import Engine, GenerationOutput
from armodal.modalities.base import OUTPUT_KINDS
from tests.conftest import SHRINK, compose_cfg
from tests.test_contract import EXPERIMENTS, KITS

AR_EXPERIMENTS = [(e, m) for e, m in EXPERIMENTS if not e.endswith("_vq")]  # the image VQ stage samples nothing
STEPS = 40


@pytest.fixture(scope="module", params=AR_EXPERIMENTS, ids=[e for e, _ in AR_EXPERIMENTS])
def trained(request, tmp_path_factory):
    """(experiment, modality, checkpoint path) of a tiny model trained for ``STEPS`` steps."""
    from armodal.train import train

    experiment, modality = request.param
    kit = KITS[modality]
    tmp = tmp_path_factory.mktemp(experiment)
    mp = pytest.MonkeyPatch()
    mp.setenv("ARMODAL_CACHE", str(tmp / "cache"))
    mp.setenv("ARMODAL_RUNS", str(tmp / "runs"))
    search = [f"hydra.searchpath=[file://{kit.CONFIG_DIR}]"] if hasattr(kit, "CONFIG_DIR") else []
    run = tmp / "run"
    train(compose_cfg("train", [f"experiment={experiment}", *SHRINK, f"trainer.max_steps={STEPS}",
                                f"trainer.val_check_interval={STEPS}", "callbacks.samples.enabled=false", "logger=csv",
                                f"run_dir={run}", *search, *kit.experiments(tmp)[experiment]], tmp))
    yield experiment, modality, run / "checkpoints" / "last.ckpt", tmp
    mp.undo()


# ----------------------------------------------------------------------------- greedy equivalence
GREEDY_WAYS = {
    "sample T=0": {"strategy": "sample", "temperature": 0.0},
    "greedy": {"strategy": "greedy"},
    "beam n=1": {"strategy": "beam", "num_beams": 1},
    "speculative draft=target": {"strategy": "speculative", "temperature": 0.0, "num_draft": 3},
    "lookahead n=1": {"strategy": "lookahead", "temperature": 0.0, "lookahead_size": 1},
    "lookahead n=3": {"strategy": "lookahead", "temperature": 0.0, "lookahead_size": 3},
}


def _decoder(model, modality: str):
    """``decode(config) -> ids`` through the modality's own decoding path, 3 rows."""
    if modality == "spatial":  # window sequences: types come from the window layout, not the tokenizer
        from armodal.modalities.spatial.geometry import spot_spacing
        from armodal.modalities.spatial.predict import _engine, sequence_layout
        from armodal.modalities.spatial.sampler import _datamodule, section_features
        from armodal.modalities.spatial.window import sample_windows

        dm, section = _datamodule(model.sampler().data, None)
        feats = section_features(model, dm, section)
        xy = torch.as_tensor(dm.adatas[section].obsm["spatial"]).double().numpy()
        layout = sequence_layout(model.config.modality.data)
        assert layout["sequence"] == "window"

        def decode(config):
            codes, _ = sample_windows(model.net, model.conditioner, model.tokenizer, feats, xy / spot_spacing(xy), 1,
                                      size=int(layout["window_size"]), order=layout["order"],
                                      generate_fn=_engine(model, config, None), spot_key=layout["spot_key"])
            return codes[:, 0]

        return decode
    cond = torch.tensor([0, 1, 2]) if model.conditioner is not None else None  # image: one per class
    n = None if cond is not None else 20  # an image is its code grid; the others: 20 tokens after BOS

    def decode(config):
        return model.generate(cond=cond, config=config.replace(max_new_tokens=n)).ids

    return decode


def _greedy_equivalence(trained, compile_: str):
    from armodal.api import load

    _, modality, ckpt, _ = trained
    model = load(ckpt)
    decode = _decoder(model, modality)
    ref = decode(GenerationConfig(strategy="greedy", compile="false"))
    for name, kw in GREEDY_WAYS.items():
        if kw["strategy"] == "speculative":
            if modality == "spatial":  # window decoding refuses it by name (the draft would need its own prefix)
                continue
            kw = {**kw, "draft_ckpt": str(ckpt)}
        out = decode(GenerationConfig(**kw, compile=compile_))
        assert torch.equal(out, ref), f"{modality}: {name} (compile={compile_}) differs from greedy"


@pytest.mark.parametrize("compile_", ["false", "true"])
def test_every_strategy_is_greedy_at_temperature_zero(trained, compile_, monkeypatch):
    """compile=true runs the FastDecoder path (persistent static caches, full-cache fixed-width step) with
    that step uncompiled; test_every_strategy_is_greedy_with_the_compiler compiles it."""
    monkeypatch.setattr("armodal.generation.fast.default_compile_mode", lambda device: "eager")
    _greedy_equivalence(trained, compile_)


@pytest.mark.slow
def test_every_strategy_is_greedy_with_the_compiler(trained):
    _greedy_equivalence(trained, "true")


# ----------------------------------------------------------------------------- the settings contract
def settings_table(ckpt: Path) -> dict[str, list[tuple[object, dict, str]]]:
    """Per field: (value, what else it needs, what the output must do: 'changes' | 'same' | 'runs')."""
    draft = {"draft_ckpt": str(ckpt)}
    return {
        # speculative with the model as its own draft accepts every draw: it may repeat plain sampling exactly
        "strategy": [("greedy", {}, "changes"), ("beam", {}, "changes"), ("speculative", draft, "runs"),
                     ("lookahead", {}, "changes")],
        "temperature": [(0.3, {}, "changes")],
        "top_k": [(1, {}, "changes")],
        "top_p": [(0.3, {}, "changes")],
        "min_p": [(0.5, {}, "changes")],
        "repetition_penalty": [(3.0, {}, "changes")],
        "cfg_scale": [(0.0, {}, "changes")],  # unconditional: the image default is 3
        "max_new_tokens": [(5, {}, "changes")],  # the base run: the modality's default, at most 24
        "constrained": [(False, {}, "changes")],
        # style rules (the four-voice music grids have them; every other tokenizer refuses by name)
        "rule_penalty": [({"parallels": float("inf"), "crossings": float("inf")}, {}, "changes")],
        "num_beams": [(2, {"strategy": "beam"}, "runs")],
        "length_penalty": [(0.0, {"strategy": "beam"}, "runs")],
        "early_stopping": [(True, {"strategy": "beam"}, "runs")],
        "draft_ckpt": [(str(ckpt), {"strategy": "speculative"}, "runs")],
        "num_draft": [(2, {"strategy": "speculative", **draft}, "runs")],
        "lookahead_size": [(2, {"strategy": "lookahead"}, "runs")],
        "compile": [("false", {}, "same"), ("true", {}, "same")],
        "quantize": [("int8", {}, "runs")],
        "seed": [(1, {}, "changes")],
    }


def _fingerprint(summary: dict) -> list[tuple[str, object]]:
    """What the sampler wrote: a digest of every declared file; an h5ad: its matrix itself (a point prediction
    computed from the logits, e.g. spatial's Rao-Blackwellised mean, moves in the last float bits when a setting
    such as compile=true runs other kernels over the same drawn tokens; the tokens are compared exactly)."""
    import anndata as ad

    out = []
    for kind in OUTPUT_KINDS:
        for p in summary.get(kind) or []:
            p = Path(p)
            out.append((p.name, np.asarray(ad.read_h5ad(p).X) if p.suffix == ".h5ad"
                        else hashlib.sha256(p.read_bytes()).hexdigest()))
    return sorted(out, key=lambda x: x[0])


def _same(a, b) -> bool:
    """Two runs' (files, token digests) agree: digests exactly, h5ad matrices to 1e-5."""
    (fa, ta), (fb, tb) = a, b
    if ta != tb or [n for n, _ in fa] != [n for n, _ in fb]:
        return False
    return all(np.allclose(x, y, rtol=1e-5, atol=1e-5) if isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
               and x.shape == y.shape else (not isinstance(x, np.ndarray) and x == y) for (_, x), (_, y) in zip(fa, fb))


def test_every_setting_is_honoured_or_refused_by_name(trained, monkeypatch):
    from armodal.api import load
    from armodal.generate import generate, route_overrides

    experiment, modality, ckpt, tmp = trained
    table = settings_table(ckpt)
    assert set(table) == set(GenerationConfig.field_names()), "a new generation setting needs a row here"
    monkeypatch.setattr("armodal.generation.fast.default_compile_mode", lambda device: "eager")  # as above
    seen: list[tuple] = []  # (net, config) of every engine the sampler runs
    made: list[str] = []  # digests of the ids of every GenerationOutput made (what the engines produced)
    init, out_init = Engine.__init__, GenerationOutput.__init__

    def spy(self, net, config, *args, **kwargs):
        seen.append((net, config))
        init(self, net, config, *args, **kwargs)

    def out_spy(self, ids, *args, **kwargs):
        made.append(hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest())
        out_init(self, ids, *args, **kwargs)

    monkeypatch.setattr(Engine, "__init__", spy)
    monkeypatch.setattr(GenerationOutput, "__init__", out_spy)
    runs = iter(range(10_000))
    model = load(ckpt)
    sampler = model.sampler(**({"audio": False} if modality == "music" else {}))
    n = sampler.generation.max_new_tokens
    short = {} if n is None else {"max_new_tokens": min(n, 24)}  # room for repeats (repetition_penalty), not more

    def run(cli: bool = False, **settings):
        """The sampler with the modality's defaults and ``settings`` (seed 0), as armodal-generate runs it;
        ``cli``: through armodal-generate itself (bare KEY=V arguments)."""
        seen.clear()
        made.clear()
        out = tmp / "gen" / str(next(runs))
        settings = {**short, **settings}
        if cli:
            args = [f"ckpt={ckpt}", "num_samples=2", f"out_dir={out}", *(["sampler.audio=false"] if modality == "music" else []),
                    *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())]
            summary = generate(compose_cfg("generate", route_overrides(args)))
        else:
            config = sampler.generation.replace(**{"seed": 0, **settings})
            torch.manual_seed(config.seed)
            summary = sampler(model, 2, out, config=config)
        return (_fingerprint(summary), list(made)), list(seen)

    base, engines = run()
    assert engines, f"{experiment}: the sampler ran no decode engine"
    report = []
    for field, rows in table.items():
        for value, needs, expect in rows:
            settings = {**needs, field: value}
            try:
                got, engines = run(cli=field == "strategy", **settings)  # each strategy: a CLI flag away
            except UnsupportedSetting as e:
                assert e.modality == modality and e.setting in settings, f"{field}={value}: {e}"
                report.append(f"{field}={value}: refused ({e.setting})")
                continue
            assert engines, f"{experiment}: {field}={value} ran no decode engine"
            want = getattr(GenerationConfig(**{"strategy": settings.get("strategy", "sample"), field: value}), field)
            bad = [getattr(cfg, field) for _, cfg in engines if getattr(cfg, field) != want]
            assert not bad, f"{experiment}: {field}={value} reached the engine as {bad[0]!r}"
            if field == "quantize":
                assert all(getattr(net, "quantized", None) == value for net, _ in engines), "fp32 weights decoded"
            if expect == "changes":
                assert not _same(got, base), f"{experiment}: {field}={value} was accepted but changed nothing"
            elif expect == "same":
                assert _same(got, base), f"{experiment}: {field}={value} must not change seeded samples"
            report.append(f"{field}={value}: honoured")
    print(f"\n{experiment}: " + "; ".join(report))


# ----------------------------------------------------------------------------- quantised decoding
@pytest.mark.parametrize("mode", ["int8", "int8_dynamic"])
def test_quantised_greedy_follows_fp32_through_the_front_door(trained, mode, tmp_path):
    """``quantize=`` decodes with a quantised copy of the weights (the model is untouched): greedy tokens
    agree with fp32 (>= 95 %); an ``armodal-export quantize=int8`` folder loads and decodes exactly like
    ``quantize=int8`` on the checkpoint."""
    from armodal.api import load
    from armodal.export import export

    _, modality, ckpt, _ = trained
    model = load(ckpt)
    decode = _decoder(model, modality)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    ref = decode(GenerationConfig(strategy="greedy"))
    out = decode(GenerationConfig(strategy="greedy", quantize=mode))
    assert out.shape == ref.shape and (out == ref).float().mean() >= 0.95, f"{modality}: {mode} greedy drifted"
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert model.net._armodal_quantized[mode][1] is not model.net
    if mode == "int8":
        folder = export(compose_cfg("export", [f"ckpt={ckpt}", f"out={tmp_path / 'int8'}", "quantize=int8"]))
        small = load(folder)
        assert small.net.quantized == "int8"
        assert torch.equal(_decoder(small, modality)(GenerationConfig(strategy="greedy")), out)
        full = export(compose_cfg("export", [f"ckpt={ckpt}", f"out={tmp_path / 'fp32'}"]))
        assert (folder / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size
        with pytest.raises(ValueError, match="quantize=int4: this model's weights are already int8"):
            _decoder(small, modality)(GenerationConfig(strategy="greedy", quantize="int4"))


def test_music_continuation_with_beam_search_from_the_command_line(trained):
    """``armodal-generate ckpt=... prompt=x.mid prompt_tokens=12 strategy=beam num_beams=4``: the prompt is
    kept and continued by the best beam (beam search itself is checked against brute force in
    test_generation.py)."""
    from armodal.api import load
    from armodal.generate import generate, route_overrides

    experiment, modality, ckpt, tmp = trained
    if experiment != "music_bach":
        pytest.skip("the MIDI-event experiment (grid experiments take 4-voice prompts; same code path)")
    prompt = sorted((tmp / "midi").rglob("*.mid"))[0]
    s = generate(compose_cfg("generate", route_overrides([
        f"ckpt={ckpt}", "num_samples=1", f"out_dir={tmp / 'beam'}", f"prompt={prompt}", "prompt_tokens=12",
        "strategy=beam", "num_beams=4", "max_new_tokens=12", "sampler.audio=false"])))
    assert s["prompt_tokens"] == 12 and s["generation"]["strategy"] == "beam" and Path(s["midi"][0]).is_file()
    model = load(ckpt)
    from symusic import Score

    ids = model.tokenizer.prompt_ids(Score(str(prompt)), str(prompt), 12, None)[None]
    beam = model.generate(ids, strategy="beam", num_beams=4, max_new_tokens=12)
    assert torch.equal(beam.ids[0, :12], ids[0]) and beam.ids.shape[1] > 12 and beam.stats["scores"]
