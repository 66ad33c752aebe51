"""Music modality: tokenizers, augmentation, JSB serialisation, datamodules, constrained sampling,
bad input.  Every fixture MIDI is written by the tests themselves."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from symusic import Note, Score, Tempo, Track

from armodal.ar_model import ARModel
from armodal.models import build_transformer
from armodal.modalities.base import load_tokenizer
from armodal.modalities.music import (
    BadMidiError,
    JSBDataModule,
    JSBTokenizer,
    MidiDataModule,
    MidiSkipWarning,
    MidiTokenizer,
    MusicEvaluator,
    MusicSampler,
    grid_to_score,
    read_midi,
    score_to_grid,
    split_of,
    time_stretch,
    transpose_grid,
)
from armodal.modalities.music.data import random_transpose

KINDS = ["midilike", "remi"]


@pytest.fixture(autouse=True)
def one_thread():
    """Token-by-token decoding of tiny models is much faster on one thread (and on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- fixtures
def make_score(seed: int = 0, n_bars: int = 4, tpq: int = 480, drums: bool = False) -> Score:
    """A small 3-voice piece on a 16th grid; voices never share a pitch, so MIDI-Like can hold it."""
    rng = np.random.default_rng(seed)
    score = Score(tpq)
    score.tempos.append(Tempo(0, 100.0))
    step = tpq // 4
    for v, (lo, hi) in enumerate([(72, 84), (60, 71), (40, 59)]):
        track = Track(f"voice{v}", 0, False)
        t = 0
        while t < n_bars * 16:
            dur = int(rng.choice([2, 4, 8]))
            track.notes.append(Note(t * step, dur * step, int(rng.integers(lo, hi + 1)), int(rng.integers(40, 110))))
            t += dur
        score.tracks.append(track)
    if drums:
        d = Track("drums", 0, True)
        d.notes.append(Note(0, step, 36, 100))
        score.tracks.append(d)
    return score


def write_folder(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        make_score(i).dump_midi(str(sub / (f"piece{i}.mid" if i % 3 else f"piece{i}.MIDI")))
    return root


def note_set(score: Score) -> list[tuple[int, int, int, int]]:
    return sorted((n.time, n.pitch, n.duration, n.velocity) for t in score.tracks for n in t.notes)


def tiny_model(tok, max_seq_len: int = 256, seed: int = 0) -> ARModel:
    torch.manual_seed(seed)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, n_layer=1, n_head=2, d_model=32,
                            max_seq_len=max_seq_len)
    return ARModel(net.eval(), tok)


def random_grid(rng: np.random.Generator, steps: int = 32) -> np.ndarray:
    grid = rng.integers(40, 78, size=(steps, 4)).astype(np.float64)
    grid[rng.random((steps, 4)) < 0.1] = np.nan
    return grid


def write_jsb(path: Path, n: tuple[int, int, int] = (6, 3, 3), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    splits = {k: np.array([random_grid(rng, int(rng.integers(20, 90))) for _ in range(m)], dtype=object)
              for k, m in zip(("train", "valid", "test"), n)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **splits)
    return path


# ----------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_matches_what_the_tokenizer_can_represent(kind, tmp_path):
    tok = MidiTokenizer(kind, beat_res={"0_4": 4, "4_12": 2}, num_velocities=8)
    for seed in range(3):
        path = tmp_path / f"p{seed}.mid"
        make_score(seed).dump_midi(str(path))
        score = read_midi(path)
        ids = tok.encode(score)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        decoded = tok.decode(ids)
        expected = tok.representable(score)
        assert note_set(decoded) == note_set(expected)
        assert len(note_set(decoded)) == sum(len(t.notes) for t in score.tracks)  # nothing lost on a 16th grid
        assert tok.grammar_errors(ids) == 0


def test_time_and_velocity_resolution_come_from_config():
    coarse = MidiTokenizer("remi", beat_res={"0_4": 2}, num_velocities=4)
    fine = MidiTokenizer("remi", beat_res={"0_4": 8}, num_velocities=16)
    n_pos = lambda t: sum(1 for s in t.id_to_token if s.startswith("Position_"))  # noqa: E731
    n_vel = lambda t: sum(1 for s in t.id_to_token if s.startswith("Velocity_"))  # noqa: E731
    assert n_pos(fine) > n_pos(coarse) and n_vel(coarse) == 4 and n_vel(fine) == 16
    score = make_score(0)
    # a 16th note cannot be represented with 2 positions per beat: quantisation changes onsets
    assert note_set(coarse.decode(coarse.encode(score))) != note_set(fine.decode(fine.encode(score)))


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_saves_and_loads(kind, tmp_path):
    tok = MidiTokenizer(kind, beat_res={"0_4": 4}, num_velocities=4)
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "miditok.json").is_file()
    back = load_tokenizer(tmp_path / "tok")
    assert isinstance(back, MidiTokenizer) and back.kind == kind and back.vocab_size == tok.vocab_size
    score = make_score(1)
    assert torch.equal(back.encode(score), tok.encode(score))
    jsb = JSBTokenizer(beat_types=True)
    jsb.save(tmp_path / "jsb")
    jb = load_tokenizer(tmp_path / "jsb")
    assert isinstance(jb, JSBTokenizer) and jb.num_types == 16 and jb.vocab_size == jsb.vocab_size


def test_unknown_tokenizer_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown MIDI tokenizer kind"):
        MidiTokenizer("abc")


# ----------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("kind", KINDS)
def test_transposition_keeps_pitches_in_range(kind):
    tok = MidiTokenizer(kind, pitch_range=(36, 90))
    ids = tok.encode(make_score(2)).numpy()
    lo, hi = tok.pitch_range
    pitch_of = lambda i: int(tok.id_value[i]) if tok.id_type[i] in ("NoteOn", "NoteOff", "Pitch") else None  # noqa: E731
    base = [p for p in map(pitch_of, ids) if p is not None]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(50):
        out = random_transpose(tok, ids, 6, rng)
        pitches = [p for p in map(pitch_of, out) if p is not None]
        assert lo <= min(pitches) and max(pitches) <= hi
        seen.add(pitches[0] - base[0])
    assert len(seen) > 3  # several shifts are really drawn
    too_far = hi - max(base) + 1
    assert tok.transpose_ids(ids, too_far) is None  # would leave the range: dropped
    shifted = tok.transpose_ids(ids, 2)
    assert [p for p in map(pitch_of, shifted) if p is not None] == [p + 2 for p in base]


def test_jsb_transposition_drops_out_of_range_shifts():
    grid = np.array([[81.0, 60, 50, 36], [np.nan, 61, 50, 37]])
    assert transpose_grid(grid, 1) is None and transpose_grid(grid, -1) is None
    grid2 = np.array([[70.0, 60, 50, 40]])
    assert np.array_equal(transpose_grid(grid2, 3), grid2 + 3)


def test_time_stretch_scales_onsets_and_durations():
    score = make_score(0)
    st = time_stretch(score, 2.0)
    a, b = note_set(score), note_set(st)
    assert [(t * 2, p, d * 2, v) for t, p, d, v in a] == b


# ----------------------------------------------------------------------------- JSB serialisation
def test_jsb_grid_tokens_grid_round_trip():
    tok = JSBTokenizer()
    rng = np.random.default_rng(0)
    for _ in range(5):
        grid = random_grid(rng, 17)
        ids = tok.encode(grid)
        assert len(ids) == 1 + 4 * 17 + 1 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        back = tok.decode(ids)
        assert np.array_equal(np.isnan(back), np.isnan(grid))
        assert np.array_equal(np.nan_to_num(back), np.nan_to_num(grid))
        assert tok.grammar_errors(ids) == 0
    assert tok.grammar_errors(torch.cat([ids[:-2], ids[-1:]])) == 1  # EOS inside a step
    assert tok.grammar_errors(torch.tensor([tok.bos_id, 10, tok.bos_id, 10, 10, tok.eos_id])) == 1  # BOS inside
    # voices in the type stream: BOS is voice 3, then S A T B S ...
    assert tok.types(ids[None])[0, :9].tolist() == [3, 0, 1, 2, 3, 0, 1, 2, 3]
    assert tok.types(ids[None, 1:])[0, :4].tolist() == [0, 1, 2, 3]  # a window without BOS
    with pytest.raises(ValueError, match="outside the tokenizer range"):
        tok.encode(np.array([[90.0, 60, 50, 40]]))
    # grid <-> MIDI: held notes merge, and the 4-track MIDI reads back to the same grid
    grid = np.array([[60.0, 55, 50, 40]] * 4 + [[62.0, 55, np.nan, 41]] * 4)
    score = grid_to_score(grid)
    assert [len(t.notes) for t in score.tracks] == [2, 1, 1, 2]
    back = score_to_grid(score)
    assert np.array_equal(np.nan_to_num(back), np.nan_to_num(grid))


def _hold_reference(grid: np.ndarray, cap: int) -> list[int]:
    """Steps each voice has held its token, per voice-step, written the slow way."""
    out = []
    for t in range(len(grid)):
        for v in range(4):
            run = 0
            while t - run - 1 >= 0 and (grid[t - run - 1, v] == grid[t, v] or
                                        (np.isnan(grid[t - run - 1, v]) and np.isnan(grid[t, v]))):
                run += 1
            out.append(min(run, cap - 1))
    return out


def test_jsb_hold_types_are_causal_and_match_a_reference(tmp_path):
    tok = JSBTokenizer(beat_types=True, hold_types=4)
    assert tok.num_types == 64
    rng = np.random.default_rng(3)
    grid = random_grid(rng, 23)
    grid = np.repeat(grid, rng.integers(1, 7, size=len(grid)), axis=0)[:40]  # held notes of 1..6 steps
    ids = tok.encode(grid)[None]
    types = tok.types(ids)
    assert (types[0, 1:-1] // 16).tolist() == _hold_reference(grid, 4)
    assert (types[0, 1:-1] % 16).tolist() == JSBTokenizer(beat_types=True).types(ids)[0, 1:-1].tolist()
    for t in range(1, ids.shape[1]):  # a prefix's types are the prefix of the types: usable while sampling
        assert torch.equal(tok.types(ids[:, :t]), types[:, :t])
    window = tok.encode(grid[8:], bos=False, eos=False)[None]  # no history before a window: counts restart
    assert (tok.types(window)[0] // 16).tolist() == _hold_reference(grid[8:], 4)
    tok.save(tmp_path / "jsb")
    assert load_tokenizer(tmp_path / "jsb").hold_types == 4
    with pytest.raises(ValueError, match="hold_types"):
        JSBTokenizer(hold_types=1)


def test_jsb_transposition_ensemble_is_a_causal_distribution(tmp_path):
    from armodal.training import dataset_nll
    from armodal.modalities.music.jsb_ensemble import shifted_log_probs, transposition_ensemble_nll

    path = write_jsb(tmp_path / "Jsb16thSeparated.npz")
    dm = JSBDataModule(str(path), window_steps=16, stride_steps=8, beat_types=True, hold_types=4)
    model = tiny_model(dm.tokenizer, 70)
    tok, ds = dm.tokenizer, dm.eval_dataset("valid")
    plain = dataset_nll(model, dm.val_dataloader())
    only0 = transposition_ensemble_nll(model.net, tok, ds, shifts=[0])
    assert only0["tokens"] == plain["tokens"] and only0["nll"] == pytest.approx(plain["nll"], rel=1e-5)
    ens = transposition_ensemble_nll(model.net, tok, ds, shifts=[-3, 0, 3])
    assert ens["tokens"] == plain["tokens"] and ens["nll_single"] == pytest.approx(plain["nll"], rel=1e-5)
    # an edge-of-range piece: +3 cannot name 80 and stops being usable once 80 is in the history
    grid = np.array([[70.0, 60, 50, 40], [80, 60, 50, 40], [70, 60, 50, 40], [72, 62, 52, 42]])
    ids = tok.encode(grid, bos=True, eos=False)
    logp, usable = shifted_log_probs(model.net, tok, ids, [0, 3])
    mix = torch.logsumexp(logp, 0) - torch.log(usable.sum(0).float())[:, None]  # [T-1, V]
    assert torch.allclose(torch.logsumexp(mix, -1), torch.zeros(len(ids) - 1), atol=1e-5)  # sums to 1
    assert usable[0].all() and usable[1, :5].all() and not usable[1, 5:].any()  # 80 enters at position 5
    nameable = torch.isfinite(logp[1, 0])
    assert not nameable[tok.num_specials + 79 - tok.low] and nameable[tok.num_specials + 78 - tok.low]
    future = ids.clone()
    future[-1] = tok.num_specials + 81 - tok.low  # a later token changes nothing earlier
    logp2, usable2 = shifted_log_probs(model.net, tok, future, [0, 3])
    assert torch.equal(usable2[:, :-1], usable[:, :-1]) and torch.allclose(logp2[:, :-1], logp[:, :-1])
    with pytest.raises(ValueError, match="must include 0"):
        transposition_ensemble_nll(model.net, tok, ds, shifts=[1])


def test_jsb_grammar_mask():
    tok = JSBTokenizer()
    m = torch.cat([tok.allowed_next(torch.tensor([[tok.bos_id] + [10] * 4])),
                   tok.allowed_next(torch.tensor([[tok.bos_id] + [10] * 3]))])
    assert m[0, tok.eos_id] and not m[1, tok.eos_id]  # EOS only after a whole step
    assert not m[:, tok.pad_id].any() and not m[:, tok.bos_id].any() and m[:, tok.rest_id].all()


# ----------------------------------------------------------------------------- datamodules
def test_midi_datamodule_shapes_splits_and_cache(tmp_path):
    root = write_folder(tmp_path / "midi", 12)
    kw = dict(tokenizer={"kind": "midilike", "beat_res": {"0_4": 4}}, cache_dir=str(tmp_path / "cache"),
              max_seq_len=64, batch_size=4, val_fraction=0.2, test_fraction=0.2, time_stretch=[1.0, 2.0])
    dm = MidiDataModule(str(root), **kw)
    dm.setup("fit")
    n = sum(len(v) for v in dm.names.values() if v)
    assert len(set(dm.names["train"]) | set(dm.names["val"]) | set(dm.names["test"])) == 12 == n - 0
    assert set(dm.names["train"]).isdisjoint(dm.names["val"])
    for rel in dm.names["val"]:
        assert split_of(rel, 0.2, 0.2) == "val"
    batch = next(iter(dm.train_dataloader()))
    assert batch["ids"].shape == (4, 64) and batch["loss_mask"].shape == (4, 64)
    assert batch["ids"].max() < dm.tokenizer.vocab_size
    val_tokens = sum(int(b["loss_mask"][:, 1:].sum()) for b in dm.val_dataloader())
    assert val_tokens == sum(len(v[0]) - 1 for v in dm.splits["val"])  # every token scored exactly once
    assert len(list((tmp_path / "cache" / "music").glob("*.pt"))) == 1
    dm2 = MidiDataModule(str(root), **kw)
    dm2.setup("fit")  # from cache, same pieces
    assert dm2.names == dm.names


def test_jsb_datamodule_scores_every_token_once(tmp_path):
    path = write_jsb(tmp_path / "jsb_chorales" / "Jsb16thSeparated.npz")
    dm = JSBDataModule(str(path), batch_size=3, window_steps=16, stride_steps=8, max_transpose=3)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["ids"].shape[0] == 3 and b["ids"].shape[1] <= dm.max_seq_len
    assert b["types"].shape == b["ids"].shape and b["types"].max() < dm.tokenizer.num_types
    for split in ("valid", "test"):
        loader = dm.val_dataloader() if split == "valid" else dm.test_dataloader()
        scored = sum(int(x["loss_mask"][:, 1:].sum()) for x in loader)
        assert scored == 4 * sum(len(g) for g in dm.pieces(split))
        for x in loader:  # never BOS / EOS / PAD
            assert (x["ids"][x["loss_mask"]] >= dm.tokenizer.rest_id).all()


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", KINDS)
def test_constrained_samples_decode_to_valid_midi(kind, tmp_path):
    tok = MidiTokenizer(kind, beat_res={"0_4": 4}, num_velocities=4)
    model = tiny_model(tok, 200)
    out = model.generate(num_samples=4, max_new_tokens=150, constrained=True, seed=0)
    for i in range(4):
        ids = out.ids[i, : out.lengths[i]]
        assert tok.grammar_errors(ids) == 0
        score = tok.decode(ids)
        path = tmp_path / f"s{i}.mid"
        score.dump_midi(str(path))
        assert len(Score(str(path)).tracks) <= 1
    # the random model does break the grammar when unconstrained
    free = model.generate(num_samples=4, max_new_tokens=150, constrained=False, seed=0)
    assert sum(tok.grammar_errors(free.ids[i, : free.lengths[i]]) for i in range(4)) > 0


def test_sampler_writes_midi_png_and_continues_prompts(tmp_path):
    tok = MidiTokenizer("midilike", beat_res={"0_4": 4}, num_velocities=4)
    model = tiny_model(tok, 256)
    sampler = MusicSampler({"max_new_tokens": 60, "seed": 1}, audio=False)
    res = sampler(model, 2, tmp_path / "out")
    assert len(res["midi"]) == 2 and len(res["images"]) == 2 and res["grammar_errors"] == [0, 0]
    assert all(Path(p).stat().st_size > 0 for p in res["midi"] + res["images"])
    prompt = tmp_path / "prompt.mid"
    make_score(3).dump_midi(str(prompt))
    res = sampler(model, 2, tmp_path / "cont", prompt=str(prompt), prompt_tokens=40)
    assert 2 <= res["prompt_tokens"] <= 40 and res["grammar_errors"] == [0, 0]
    assert (tmp_path / "cont" / "prompt.mid").is_file()
    res = sampler(model, 1, tmp_path / "bars", prompt=str(prompt), prompt_bars=1)
    assert res["prompt_tokens"] > 2


def test_jsb_samples_are_four_voice_chorales(tmp_path):
    tok = JSBTokenizer()
    model = tiny_model(tok, 140)
    res = MusicSampler({"max_new_tokens": 129, "seed": 0}, qpm=80, audio=False)(model, 3, tmp_path)
    assert res["grammar_errors"] == [0, 0, 0]
    for p in res["midi"]:
        score = Score(p)
        assert len(score.tracks) == 4
        assert score_to_grid(score).shape[1] == 4
    # a 4-voice prompt continues; a piano file is refused with a message naming it
    prompt = tmp_path / "prompt.mid"
    grid_to_score(random_grid(np.random.default_rng(1), 16)).dump_midi(str(prompt))
    res = MusicSampler({"max_new_tokens": 41}, audio=False)(model, 1, tmp_path / "c", prompt=str(prompt), prompt_tokens=33)
    assert res["prompt_tokens"] == 33
    piano = tmp_path / "piano.mid"
    make_score(0).dump_midi(str(piano))
    with pytest.raises(ValueError, match="piano.mid: a JSB prompt must be a 4-voice MIDI"):
        MusicSampler(audio=False)(model, 1, tmp_path / "d", prompt=str(piano))


def test_evaluator_metrics(tmp_path):
    path = write_jsb(tmp_path / "Jsb16thSeparated.npz")
    dm = JSBDataModule(str(path), window_steps=16, stride_steps=8)
    model = tiny_model(dm.tokenizer, 70)
    m = MusicEvaluator(num_samples=3, generation={"max_new_tokens": 64})(model, dm, tmp_path)
    assert m["music/grammar_error_rate"] == 0.0 and m["music/num_samples"] == 3
    assert 0 <= m["music/pitch_class_hist_l1"] <= 2 and m["music/ref_polyphony"] > 1
    assert (tmp_path / "music_metrics.json").is_file()


# ----------------------------------------------------------------------------- bad input
def _bad_files(root: Path) -> dict[str, str]:
    """file name -> expected reason fragment."""
    root.mkdir(parents=True, exist_ok=True)
    good = root / "good.mid"
    make_score(0).dump_midi(str(good))
    data = good.read_bytes()
    (root / "corrupt.mid").write_bytes(b"this is not a MIDI file at all" * 4)
    (root / "truncated.mid").write_bytes(data[: len(data) // 2])
    (root / "zero.mid").write_bytes(b"")
    Score(480).dump_midi(str(root / "empty.mid"))
    drums = Score(480)
    d = Track("drums", 0, True)
    d.notes.append(Note(0, 120, 36, 100))
    drums.tracks.append(d)
    drums.dump_midi(str(root / "drums.mid"))
    big = make_score(5, n_bars=64)
    big.dump_midi(str(root / "huge.mid"))
    return {"corrupt.mid": "corrupt or truncated", "truncated.mid": "corrupt or truncated",
            "zero.mid": "empty file", "empty.mid": "empty MIDI", "drums.mid": "drum-only", "huge.mid": "too large"}


def test_bad_files_are_skipped_with_a_named_warning_and_counted(tmp_path, capsys):
    expected = _bad_files(tmp_path / "midi")
    for i in (1, 2):  # train, val and test each need a piece of their own
        make_score(i).dump_midi(str(tmp_path / "midi" / f"good{i}.mid"))
    max_bytes = (tmp_path / "midi" / "huge.mid").stat().st_size - 1
    assert (tmp_path / "midi" / "good.mid").stat().st_size < max_bytes
    dm = MidiDataModule(str(tmp_path / "midi"), tokenizer={"kind": "remi"}, max_seq_len=64, max_bytes=max_bytes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup("fit")
    msgs = [str(w.message) for w in caught if issubclass(w.category, MidiSkipWarning)]
    assert len(msgs) == len(expected)
    for name, reason in expected.items():
        assert any(name in m and reason in m for m in msgs), (name, msgs)
    assert f"skipped {len(expected)} of {len(expected) + 3} MIDI files" in capsys.readouterr().out
    assert sorted(sum(dm.names.values(), [])) == ["good.mid", "good1.mid", "good2.mid"]


def test_bad_prompt_files_are_clear_errors(tmp_path):
    expected = _bad_files(tmp_path / "midi")
    model = tiny_model(MidiTokenizer("midilike"), 64)
    for name, reason in expected.items():
        if name == "huge.mid":
            continue  # only "huge" relative to a dataset's max_bytes
        with pytest.raises(BadMidiError, match=f"{name}: .*{reason}"):
            MusicSampler(audio=False)(model, 1, tmp_path / "o", prompt=str(tmp_path / "midi" / name))
    with pytest.raises(BadMidiError, match="file not found"):
        MusicSampler(audio=False)(model, 1, tmp_path / "o", prompt=str(tmp_path / "nope.mid"))


def test_all_bad_folder_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.mid").write_bytes(b"junk")
    with pytest.warns(MidiSkipWarning, match="x.mid"):
        with pytest.raises(ValueError, match="none of the 1 MIDI files could be used"):
            MidiDataModule(str(tmp_path / "m"), max_seq_len=32).setup()
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no .mid / .midi files"):
        MidiDataModule(str(tmp_path / "none"), max_seq_len=32).setup()
    with pytest.raises(FileNotFoundError, match="MIDI folder not found"):
        MidiDataModule(str(tmp_path / "missing"), max_seq_len=32).setup()
