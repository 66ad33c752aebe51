"""Harmonising a melody: reading the soprano, the refusals, and the forced soprano during decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import pytest
from symusic import Note, Score, TimeSignature, Track

from armodal.modalities.music import ChoraleTokenizer, JSBTokenizer
from armodal.modalities.music.harmonize import MelodyError, forced_steps, melody_from_chorale, read_melody
from tests.test_music_chorales import CADENCE, four_bars

TPQ = 480


def write_melody(path: Path, notes: list[tuple[float, float, int]], tracks: int = 1,
                 meter: tuple[int, int] | None = (4, 4)) -> Path:
    """(onset, length, pitch) in quarters -> a MIDI file with ``tracks`` copies of the line."""
    score = Score(TPQ)
    if meter is not None:
        score.time_signatures.append(TimeSignature(0, *meter))
    for k in range(tracks):
        t = Track(f"voice{k}", 0, False)
        for a, la, p in notes:
            t.notes.append(Note(int(a * TPQ), int(la * TPQ), p - 12 * k, 80))
        score.tracks.append(t)
    score.dump_midi(str(path))
    return path


# a four-bar hymn tune in C: quarters and halves, ending on a whole note
TUNE = [(0, 1, 67), (1, 1, 69), (2, 1, 71), (3, 1, 72), (4, 2, 71), (6, 2, 69),
        (8, 1, 67), (9, 1, 65), (10, 1, 64), (11, 1, 62), (12, 4, 60)]


def test_midi_melody_is_read_onto_the_grid(tmp_path):
    mel, known = read_melody(write_melody(tmp_path / "tune.mid", TUNE))
    assert not known  # a MIDI melody carries no fermatas
    assert mel.grid.shape == (64, 4) and np.isnan(mel.grid[:, 1:]).all()
    assert mel.grid[:4, 0].tolist() == [67] * 4 and mel.grid[16:24, 0].tolist() == [71] * 8
    assert (mel.bar_len, mel.first_pos) == (16, 0)  # the key comes from the melody alone (profiles)


def test_refuses_a_melody_of_more_than_one_voice(tmp_path):
    with pytest.raises(MelodyError, match=r"two\.mid: 2 voices"):
        read_melody(write_melody(tmp_path / "two.mid", TUNE, tracks=2))
    chords = TUNE[:3] + [(2, 1, 64)] + TUNE[3:]  # two notes at quarter 2 in one track
    with pytest.raises(MelodyError, match=r"chord\.mid: more than one voice.*quarter 2"):
        read_melody(write_melody(tmp_path / "chord.mid", chords))


def test_refuses_notes_outside_the_model_range(tmp_path):
    tok = ChoraleTokenizer(hold_types=8)
    high = [(a, la, p + 24) for a, la, p in TUNE]  # up to C7 (96) > 81
    mel, known = read_melody(write_melody(tmp_path / "high.mid", high))
    with pytest.raises(MelodyError, match=r"high\.mid: note 96 lies outside the model's range \[36, 81\]"):
        forced_steps(tok, mel, known, where=str(tmp_path / "high.mid"))
    low = [(a, la, p - 30) for a, la, p in TUNE]
    mel, known = read_melody(write_melody(tmp_path / "low.mid", low))
    with pytest.raises(MelodyError, match="note 30 lies outside"):
        forced_steps(JSBTokenizer(), mel, known, where="low.mid")


def test_refuses_a_meter_the_grid_cannot_hold(tmp_path):
    tok = ChoraleTokenizer(hold_types=8)  # meters 3/4, 4/4, 3/2
    mel, known = read_melody(write_melody(tmp_path / "five.mid", TUNE, meter=(5, 4)))
    with pytest.raises(MelodyError, match=r"five\.mid: a bar of 20 16ths \(5/4\) is not a meter"):
        forced_steps(tok, mel, known, where=str(tmp_path / "five.mid"))
    with pytest.raises(MelodyError, match=r"seven\.mid: the 16th-note grid cannot hold a 7/32 bar"):
        read_melody(write_melody(tmp_path / "seven.mid", TUNE, meter=(7, 32)))
    triplets = [(0, 1 / 3, 67), (1 / 3, 1 / 3, 69), (2 / 3, 1 / 3, 71)] + [(a + 1, la, p) for a, la, p in TUNE[:4]]
    with pytest.raises(MelodyError, match=r"trip\.mid: the 16th-note grid cannot hold a note"):
        read_melody(write_melody(tmp_path / "trip.mid", triplets))


def test_refuses_unreadable_and_unknown_sources(tmp_path):
    (tmp_path / "bad.mid").write_bytes(b"MThd garbage")
    with pytest.raises(ValueError, match="bad.mid"):
        read_melody(tmp_path / "bad.mid")
    (tmp_path / "tune.txt").write_text("C D E")
    with pytest.raises(MelodyError, match=r"tune\.txt: unknown melody format"):
        read_melody(tmp_path / "tune.txt")
    with pytest.raises(MelodyError, match="no/such_chorale: neither a melody file nor a music21 corpus chorale"):
        read_melody("no/such_chorale")


def test_corpus_soprano_forces_header_and_every_soprano_token():
    mel, known = read_melody("bach/bwv269")
    assert known and mel.fermata.any() and np.isnan(mel.grid[:, 1:]).all()
    tok = ChoraleTokenizer(hold_types=8)
    header, choice = forced_steps(tok, mel, known)
    assert len(header) == 4 and header[0] == tok.bos_id
    assert choice.shape == (len(mel.grid), tok.vocab_size)
    assert (choice.sum(1) == 1).all()  # fermatas known: exactly one soprano id per step
    sop = tok.encode(melody_from_chorale(mel))[4::4][: len(mel.grid)]
    assert choice[np.arange(len(mel.grid)), sop].all()
    # a MIDI melody (no fermatas): each sounding soprano pitch may carry a fermata or not
    mel.fermata[:] = False
    _, free = forced_steps(tok, mel, False)
    sounding = ~np.isnan(mel.grid[:, 0])
    assert (free.sum(1)[sounding] == 2).all() and (free.sum(1)[~sounding] == 1).all()


def test_four_bar_melody_round_trips_through_the_forcing_table():
    mel = melody_from_chorale(four_bars(CADENCE))
    tok = ChoraleTokenizer(hold_types=8)
    _, choice = forced_steps(tok, mel, True)
    ids = choice.float().argmax(1).numpy()
    back = np.where(ids >= tok.fermata0, ids - (tok.fermata0 - tok.pitch0), ids) - tok.pitch0 + tok.low
    np.testing.assert_array_equal(back, mel.grid[:, 0])


# ----------------------------------------------------------------------------- decoding with the soprano forced
def tiny_model(tok, max_seq_len: int = 128):
    import torch

    from armodal.ar_model import ARModel
    from armodal.models import build_transformer

    torch.manual_seed(0)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, n_layer=1, n_head=2, d_model=32,
                            max_seq_len=max_seq_len)
    return ARModel(net.eval(), tok)


@pytest.mark.parametrize("tok", [ChoraleTokenizer(hold_types=8), JSBTokenizer(hold_types=8)], ids=["chorale", "jsb"])
def test_harmonisation_keeps_the_soprano_exactly(tok):
    """An untrained model writes whatever it likes into alto, tenor and bass, but the soprano is the melody's,
    also across window restarts (a 64-step melody in a 128-token context) and without known fermatas."""
    from armodal.generation import GenerationConfig
    from armodal.modalities.music.harmonize import harmonize

    model = tiny_model(tok)
    tune = four_bars(CADENCE)
    tune.grid[:, 0] = np.repeat([67, 69, 71, 72, 71, 69, 67, 65, 64, 62, 60, 62, 64, 62, 60, 60], 4)  # moving line
    tune.grid[20:24, 0] = np.nan  # a soprano rest
    mel = melody_from_chorale(tune)
    for known in (True, False):
        seqs = harmonize(model, mel, known, GenerationConfig(seed=1), num_samples=3)
        assert len(seqs) == 3
        for ids in seqs:
            assert tok.grammar_errors(ids) == 0
            back = tok.to_chorale(ids)
            np.testing.assert_array_equal(back.grid[:, 0], mel.grid[:, 0])
            assert back.grid.shape == mel.grid.shape and not np.isnan(back.grid[:, 1:]).all()
            if isinstance(tok, ChoraleTokenizer) and known:
                np.testing.assert_array_equal(back.fermata, mel.fermata)
    greedy = [harmonize(model, mel, True, GenerationConfig(strategy="greedy"), 1)[0] for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])


def test_harmonisation_refuses_settings_it_cannot_honour():
    from armodal.generation import GenerationConfig, UnsupportedSetting
    from armodal.modalities.music.harmonize import harmonize

    tok = ChoraleTokenizer(hold_types=8)
    model = tiny_model(tok)
    mel = melody_from_chorale(four_bars(CADENCE))
    with pytest.raises(UnsupportedSetting, match="strategy='beam'.*harmonis"):
        harmonize(model, mel, True, GenerationConfig(strategy="beam"), 1)
    with pytest.raises(UnsupportedSetting, match="max_new_tokens=40.*the melody"):
        harmonize(model, mel, True, GenerationConfig(max_new_tokens=40), 1)


def test_generate_cli_harmonises_a_midi_melody(tmp_path):
    """``armodal-generate ckpt=... task=harmonize melody=soprano.mid num_samples=2`` on a smoke-trained default run."""
    import json

    from armodal.generate import generate, route_overrides
    from tests.conftest import SHRINK, compose_cfg
    from tests.test_experiments import smoke_train

    run = Path(smoke_train("music_chorales", tmp_path)["run_dir"])
    mel = write_melody(tmp_path / "soprano.mid", TUNE)
    out = tmp_path / "harm"
    cfg = compose_cfg("generate", route_overrides([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "task=harmonize",
                                                   f"melody={mel}", "num_samples=2", f"out_dir={out}"]))
    summary = generate(cfg)
    assert summary["soprano_kept"] == [True, True] and summary["grammar_errors"] == [0, 0]
    assert (out / "melody.mid").is_file() and len(summary["midi"]) == 2 and len(summary["images"]) == 2
    assert json.loads((out / "summary.json").read_text())["task"] == "harmonize"
    with pytest.raises(ValueError, match=r"two\.mid: 2 voices"):
        generate(compose_cfg("generate", route_overrides([f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "task=harmonize",
                                                          f"melody={write_melody(tmp_path / 'two.mid', TUNE, 2)}",
                                                          f"out_dir={tmp_path / 'h2'}"])))
