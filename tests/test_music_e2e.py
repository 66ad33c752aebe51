"""Music end to end through the real configs (composed and shrunk): train -> generate -> eval on a
MIDI fixture folder and on a JSB-format fixture; plus the real JSB file when ../shared/data has it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from armodal.modalities.music import JSBDataModule, load_jsb

from test_music import make_score, write_folder, write_jsb

SMALL_MODEL = ["model.d_model=32", "model.n_layer=1", "model.n_head=2"]
SHRINK = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "logger=csv",
          "callbacks.samples.num_samples=1", "callbacks.progress.refresh_rate=0"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from armodal.utils.config import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def shared_jsb() -> Path:
    root = Path(os.environ.get("ARMODAL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    return root / "jsb_chorales" / "Jsb16thSeparated.npz"


@pytest.mark.parametrize("experiment,modality", [("music_bach", None), ("music_bach", "music_remi"), ("music_jsb", None)])
def test_experiment_configs_compose(experiment, modality):
    cfg = _compose("train", [f"experiment={experiment}"] + ([f"modality={modality}"] if modality else []))
    assert cfg.modality.name == "music" and cfg.name == experiment
    targets = [cfg.modality.data._target_, cfg.modality.sampler._target_, cfg.modality.evaluator._target_]
    assert all(t.startswith("armodal.modalities.music.") for t in targets)
    if experiment == "music_bach":
        assert cfg.modality.data.tokenizer.kind == ("remi" if modality else "midilike")
        assert cfg.modality.data.max_seq_len == cfg.model.max_seq_len
    else:
        assert cfg.model.max_seq_len >= 4 * cfg.modality.data.window_steps + 2


@pytest.mark.parametrize("kind", ["midilike", pytest.param("remi", marks=pytest.mark.slow)])
def test_midi_folder_train_generate_eval(kind, tmp_path, monkeypatch):
    from armodal.api import load
    from armodal.eval import evaluate
    from armodal.generate import generate, route_overrides
    from armodal.train import train

    monkeypatch.setenv("ARMODAL_CACHE", str(tmp_path / "cache"))
    root = write_folder(tmp_path / "midi", 10)
    run = tmp_path / "run"
    train(_compose("train", ["experiment=music_bach", f"modality.data.tokenizer.kind={kind}", f"modality.data.root={root}",
                             f"run_dir={run}", "model.max_seq_len=96", "modality.data.batch_size=4",
                             "++modality.sampler.generation.max_new_tokens=40", *SMALL_MODEL, *SHRINK]))
    assert (run / "tokenizer" / "miditok.json").is_file()
    assert sorted(run.glob("samples/*/sample_00.png")), "the training callback wrote no piano roll"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert load(ckpt).tokenizer.kind == kind

    prompt = tmp_path / "prompt.mid"
    make_score(7).dump_midi(str(prompt))
    out = tmp_path / "gen"
    summary = generate(_compose("generate", route_overrides([f"ckpt={ckpt}", "num_samples=2", f"out_dir={out}", "max_new_tokens=30",
                                             f"prompt={prompt}", "prompt_tokens=20", "top_k=20", "temperature=0.9"])))
    assert len(summary["midi"]) == 2 and summary["grammar_errors"] == [0, 0]
    assert (out / "sample_01.mid").is_file() and (out / "sample_01.png").is_file()
    assert summary["audio"] or "fluidsynth" in summary.get("audio_note", "")

    m = evaluate(_compose("eval", [f"ckpt={ckpt}", f"out={tmp_path / 'eval.json'}", "num_samples=2",
                                   "++generation.max_new_tokens=30"]))
    assert m["val"]["tokens"] > 0 and m["music/grammar_error_rate"] == 0.0
    assert "music/pitch_class_hist_l1" in json.loads((tmp_path / "eval.json").read_text())


def test_jsb_train_generate_eval_on_fixture(tmp_path):
    from armodal.eval import evaluate
    from armodal.generate import generate, route_overrides
    from armodal.train import train

    path = write_jsb(tmp_path / "jsb_chorales" / "Jsb16thSeparated.npz")
    run = tmp_path / "run"
    train(_compose("train", ["experiment=music_jsb", f"paths.data_dir={tmp_path}", f"run_dir={run}",
                             "modality.data.window_steps=16", "modality.data.stride_steps=8", "model.max_seq_len=66",
                             "modality.sampler.generation.max_new_tokens=33", *SMALL_MODEL, *SHRINK]))
    ckpt = run / "checkpoints" / "last.ckpt"
    summary = generate(_compose("generate", [f"ckpt={ckpt}", "num_samples=2", f"out_dir={tmp_path / 'gen'}"]))
    from symusic import Score

    assert all(len(Score(p).tracks) == 4 for p in summary["midi"]) and summary["grammar_errors"] == [0, 0]
    m = evaluate(_compose("eval", [f"ckpt={ckpt}", f"out={tmp_path / 'eval.json'}", "num_samples=2",
                                   "++generation.max_new_tokens=32"]))
    n_valid = 4 * sum(len(g) for g in load_jsb(path)["valid"])
    assert m["val"]["tokens"] == n_valid  # the generic val NLL covers exactly the voice-step tokens
    assert m["music/grammar_error_rate"] == 0.0


@pytest.mark.real_data
def test_real_jsb_file():
    path = shared_jsb()
    if not path.is_file():
        pytest.skip(f"{path} not present (set ARMODAL_SHARED_DATA)")
    splits = load_jsb(path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 229, "valid": 76, "test": 77}
    notes = np.concatenate([g.ravel() for s in splits.values() for g in s])
    notes = notes[~np.isnan(notes)]
    assert notes.min() >= 36 and notes.max() <= 81
    dm = JSBDataModule(str(path), window_steps=128, stride_steps=64)
    scored = sum(int(b["loss_mask"][:, 1:].sum()) for b in dm.val_dataloader())
    assert scored == 4 * sum(len(g) for g in splits["valid"]) == 73632
    tok = dm.tokenizer
    for g in splits["valid"][:10]:  # every real piece survives grid -> tokens -> grid
        back = tok.decode(tok.encode(g))
        assert np.array_equal(np.nan_to_num(back, nan=-1), np.nan_to_num(g, nan=-1))
