"""Chorale grids from music21's corpus and the chorale metrics, on hand-written four-bar examples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from armodal.modalities.music.analysis import (
    bar_keys,
    cadences,
    chorale_metrics,
    compare_chorales,
    key_of,
    parallels,
    sonorities,
)
from armodal.modalities.music import ChoraleDataModule, ChoraleTokenizer, score_to_grid
from armodal.modalities.music.chorales import Chorale, load_chorales, save_chorales


def random_chorale(rng: np.random.Generator, steps: int, split: str = "train") -> Chorale:
    """A random four-voice chorale (4/4 or 3/4, random pickup, fermatas every 2 bars) for fixtures."""
    bar = int(rng.choice([12, 16]))
    grid = np.repeat(rng.integers(48, 76, size=(steps // 4 + 1, 4)).astype(np.float64), 4, axis=0)[:steps]
    grid[:, 0] += 5  # the soprano on top most of the time
    fermata = (np.arange(steps) // 4) % 8 == 7
    return Chorale(f"random{int(rng.integers(1e6))}", grid, fermata, int(rng.integers(12)),
                   str(rng.choice(["major", "minor"])), bar, int(rng.choice([0, bar - 4])), split)


def write_chorales(path: Path, n: tuple[int, int, int] = (6, 3, 3), seed: int = 0) -> Path:
    """A small chorale grid file with random pieces in train / valid / test (and one excluded)."""
    rng = np.random.default_rng(seed)
    pieces = [random_chorale(rng, int(rng.integers(24, 90)), split) for split, m in zip(("train", "valid", "test"), n)
              for _ in range(m)]
    pieces.append(random_chorale(rng, 40, "excluded"))
    return save_chorales(pieces, path)


def four_bars(chords, fermata_last: bool = True, bar_len: int = 16) -> Chorale:
    """Four whole-note chords (S, A, T, B MIDI pitches) in 4/4 -> a Chorale; fermata on the last."""
    grid = np.repeat(np.asarray(chords, dtype=np.float64), bar_len, axis=0)
    fermata = np.zeros(len(grid), dtype=bool)
    if fermata_last:
        fermata[-bar_len:] = True
    return Chorale("hand", grid, fermata, 0, "major", bar_len, 0)


# I - IV - V - I in C major, good voice leading, fermata on the final tonic
CADENCE = [(67, 64, 60, 48), (69, 65, 60, 53), (67, 62, 59, 55), (72, 67, 64, 48)]
# C - Dm (tenor and bass G3/C3 -> A3/D3: one parallel fifth) - G - C
PARALLEL_FIFTH = [(72, 64, 55, 48), (77, 65, 57, 50), (74, 67, 59, 43), (72, 64, 55, 48)]
# the alto climbs above the soprano in bar 2 (one crossing), no parallels
CROSSING = [(67, 64, 55, 48), (64, 67, 55, 48), (65, 62, 53, 50), (64, 60, 55, 52)]


def test_parallel_fifth_known_answer():
    m = chorale_metrics([four_bars(PARALLEL_FIFTH)])
    assert m["parallel_fifths_per_100"] == pytest.approx(100 / 3)  # 1 of 3 voice-leading steps
    assert m["parallel_octaves_per_100"] == 0
    assert m["voice_crossing_per_100"] == 0
    for clean in (CADENCE, CROSSING):
        m = chorale_metrics([four_bars(clean)])
        assert m["parallel_fifths_per_100"] == 0 and m["parallel_octaves_per_100"] == 0


def test_parallel_octaves_and_contrary_fifths():
    # soprano and alto an octave apart, both step up: parallel octaves; contrary motion into a fifth is not
    _, p5, p8 = parallels(np.array([[72, 60, 55, 48], [74, 62, 53, 47]]))
    assert (p5, p8) == (0, 1)
    _, p5, p8 = parallels(np.array([[67, 64, 60, 48], [67, 64, 62, 55]]))  # tenor/bass to a fifth, from a 12th
    assert (p5, p8) == (0, 0)
    _, p5, _ = parallels(np.array([[67, 64, 55, 48], [69, 65, 57, 50]]))  # T/B 5th -> 5th, both up
    assert p5 == 1


def test_crossing_known_answer():
    m = chorale_metrics([four_bars(CROSSING)])
    assert m["voice_crossing_per_100"] == pytest.approx(25.0)  # 1 of 4 sonorities
    assert chorale_metrics([four_bars(CADENCE)])["voice_crossing_per_100"] == 0


def test_cadence_known_answer():
    assert cadences(four_bars(CADENCE)) == (1, 1)  # V - I at the fermata
    assert cadences(four_bars(CADENCE[:3] + [CADENCE[1]])) == (1, 0)  # ending V - IV is no cadence
    half = four_bars([CADENCE[0], CADENCE[1], CADENCE[0], CADENCE[2]])  # I IV I V: a half cadence
    assert cadences(half) == (1, 0)
    plagal = four_bars([CADENCE[0], CADENCE[2], CADENCE[1], CADENCE[3]])  # I V IV I
    assert cadences(plagal) == (1, 1)
    inverted = four_bars(CADENCE[:3] + [(72, 67, 60, 52)])  # V - I6: the tonic not in the bass
    assert cadences(inverted) == (1, 0)
    assert cadences(four_bars(CADENCE, fermata_last=False)) == (0, 0)
    m = chorale_metrics([four_bars(CADENCE), half])
    assert m["cadence_share"] == 0.5 and m["phrase_endings"] == 2
    assert np.isnan(chorale_metrics([four_bars(CADENCE, fermata_last=False)])["cadence_share"])


def test_key_stability_known_answer():
    gkey, keys = bar_keys(four_bars(CADENCE))
    assert gkey == (0, "major")
    assert keys == [(0, "major"), (5, "major"), (7, "major"), (0, "major")]  # C, F, G, C triads
    assert chorale_metrics([four_bars(CADENCE)])["key_stability"] == 0.5


def test_key_of_matches_music21_analysis():
    from music21 import note, stream

    rng = np.random.default_rng(0)
    for _ in range(20):
        pitches = rng.integers(48, 72, size=int(rng.integers(3, 12)))
        lengths = rng.integers(1, 5, size=len(pitches))
        s = stream.Stream()
        pcs = np.zeros(12)
        for p, q in zip(pitches, lengths):
            s.append(note.Note(int(p), quarterLength=float(q)))
            pcs[p % 12] += q
        k = s.analyze("key")
        assert key_of(pcs) == (k.tonic.pitchClass, k.mode)


def test_density_polyphony_and_pitch_classes():
    ch = four_bars(CADENCE)
    ch.grid[:8, 3] = np.nan  # the bass rests for the first half bar
    m = chorale_metrics([ch])
    assert m["note_density"] == pytest.approx(15 / 16)  # 15 notes (the tenor holds C4 over bars 1-2) in 16 quarters
    assert m["polyphony"] == pytest.approx((8 * 3 + 56 * 4) / 64)
    steps, chords = sonorities(ch.grid)
    assert list(steps) == [8, 16, 32, 48]  # step 0 lacks the bass; its entry at step 8 is a full sonority
    same = compare_chorales([four_bars(CADENCE)], [four_bars(CADENCE)])
    assert same["pitch_class_hist_l1"] == 0 and same["key_stability_rel_err"] == 0
    c_major = [(67, 64, 60, 48)] * 4  # G, E, C, C held for four bars: 4 notes
    other = compare_chorales([four_bars(c_major)], [four_bars([[p + 1 for p in c] for c in c_major])])
    assert other["pitch_class_hist_l1"] == pytest.approx(2.0)  # C major vs C# major triads: disjoint pitch classes


def test_chorale_file_round_trip(tmp_path):
    a = four_bars(CADENCE)
    b = Chorale("b", four_bars(CROSSING, False, 12).grid, np.zeros(48, bool), 9, "minor", 12, 8, "test")
    b.grid[3, 2] = np.nan
    path = save_chorales([a, b], tmp_path / "c.npz")
    back = load_chorales(path)
    for x, y in zip([a, b], back):
        np.testing.assert_array_equal(x.grid, y.grid)
        np.testing.assert_array_equal(x.fermata, y.fermata)
        assert (x.name, x.tonic, x.mode, x.bar_len, x.first_pos, x.split) == (
            y.name, y.tonic, y.mode, y.bar_len, y.first_pos, y.split)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz: not a chorale grid file"):
        load_chorales(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_chorales(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- corpus grid and tokenizer
CORPUS = Path(__file__).resolve().parents[1] / "datasets" / "bach_chorales" / "chorales.npz"


@pytest.fixture(scope="module")
def corpus():
    return load_chorales(CORPUS)


def test_corpus_file_holds_the_chorales_with_fermatas_keys_and_splits(corpus):
    assert len(corpus) >= 340
    splits = {s: sum(c.split == s for c in corpus) for s in ("train", "valid", "test", "excluded")}
    assert splits["train"] >= 150 and splits["valid"] >= 30 and splits["test"] >= 30
    assert all(c.fermata.any() for c in corpus[:50])  # phrase endings are marked
    assert {c.bar_len for c in corpus} <= {12, 16, 24}
    assert all(0 <= c.first_pos < c.bar_len for c in corpus)
    assert sum(c.first_pos == 12 for c in corpus if c.bar_len == 16) > 100  # most start on a one-beat pickup
    # same names never sit in two splits
    names = {}
    for c in corpus:
        assert names.setdefault(c.name, c.split) == c.split


def test_corpus_conversion_matches_music21(corpus):
    """A chorale parsed from music21's corpus again gives the stored grid, fermatas, key and pickup."""
    from music21 import corpus as m21corpus

    from armodal.modalities.music.chorales import chorale_from_music21

    stored = {c.name: c for c in corpus}
    for name in ("bach/bwv269", "bach/bwv347"):
        fresh = chorale_from_music21(m21corpus.parse(name), name=name)
        ref = stored[name]
        np.testing.assert_array_equal(fresh.grid, ref.grid)
        np.testing.assert_array_equal(fresh.fermata, ref.fermata)
        assert (fresh.tonic, fresh.mode, fresh.bar_len, fresh.first_pos) == (ref.tonic, ref.mode, ref.bar_len,
                                                                               ref.first_pos)
    bwv269 = stored["bach/bwv269"]  # G major, 3/4, one-beat pickup: starts at 16th 8 of the bar
    assert (bwv269.tonic, bwv269.mode, bwv269.bar_len, bwv269.first_pos) == (7, "major", 12, 8)


def test_chorale_grid_round_trips_on_corpus_chorales(corpus):
    """ids -> Chorale and grid -> MIDI -> grid give back exactly what the grid holds."""
    tok = ChoraleTokenizer(hold_types=8)
    for ch in corpus[::7]:
        ids = tok.encode(ch)
        back = tok.decode(ids)
        np.testing.assert_array_equal(back.grid, ch.grid)
        np.testing.assert_array_equal(back.fermata, ch.fermata)
        assert (back.tonic, back.mode, back.bar_len, back.first_pos) == (ch.tonic, ch.mode, ch.bar_len, ch.first_pos)
        assert tok.grammar_errors(ids) == 0
        np.testing.assert_array_equal(score_to_grid(tok.to_score(ids))[: len(ch.grid)], ch.grid[: len(
            score_to_grid(tok.to_score(ids)))])


def test_chorale_types_are_causal_and_carry_the_bar_position(corpus):
    tok = ChoraleTokenizer(hold_types=8)
    ch = next(c for c in corpus if c.bar_len == 16 and c.first_pos == 12)
    ids = tok.encode(ch)[None]
    ty = tok.types(ids)
    for cut in (1, 3, 5, 37, 201):
        assert torch.equal(tok.types(ids[:, :cut]), ty[:, :cut])  # a prefix's types are the prefix of the types
    voice, pos = ty[0] % 4, (ty[0] // 4) % tok.max_bar
    assert voice[4:12].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # S1 at index 4 (BOS KEY METER POS first)
    assert pos[4:8].tolist() == [12] * 4 and pos[8:12].tolist() == [13] * 4 and pos[20:24].tolist() == [0] * 4
    window = tok.encode(ch[16:80], bos=False)[None]  # a window inside the piece: header, no BOS
    assert ((tok.types(window)[0, 3:] // 4) % tok.max_bar)[:4].tolist() == [12] * 4  # step 16 sits at 12 too


def test_chorale_grammar_agrees_with_the_mask(corpus):
    tok = ChoraleTokenizer()
    ids = tok.encode(corpus[0][:8])
    assert tok.grammar_errors(ids) == 0
    rng = np.random.default_rng(0)
    for _ in range(30):
        bad = ids.clone()
        bad[int(rng.integers(1, len(bad)))] = int(rng.integers(0, tok.vocab_size))
        by_mask = sum(int(not tok.allowed_next(bad[None, :t])[0, bad[t]]) for t in range(len(bad)))
        assert tok.grammar_errors(bad) >= min(1, by_mask)
        if by_mask == 0:
            assert tok.grammar_errors(bad) == 0
    alto_fermata = ids.clone()
    alto_fermata[5] = alto_fermata[4] if alto_fermata[4] >= tok.fermata0 else tok.fermata0 + 20  # alto: no fermata ids
    assert tok.grammar_errors(alto_fermata) >= 1
    with pytest.raises(ValueError, match="5/4"):
        tok.encode(Chorale("odd", np.full((20, 4), 60.0), np.zeros(20, bool), 0, "major", 20, 0))


def test_chorale_datamodule_windows_and_scoring():
    dm = ChoraleDataModule(str(CORPUS), batch_size=4, window_steps=32, stride_steps=16, hold_types=8)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["ids"].shape[1] <= dm.max_seq_len and b["types"].max() < dm.tokenizer.num_types
    for row, mask in zip(b["ids"], b["loss_mask"]):
        if row[0] != dm.tokenizer.bos_id:  # a window inside a piece: its header is context, not a target
            assert not mask[:3].any() and mask[3]
    pieces = dm.pieces("valid")
    scored = sum(int(x["loss_mask"].sum()) for x in dm.val_dataloader())
    assert scored == sum(4 * len(c) + 3 for c in pieces)  # every voice-step once, + KEY METER POS of each piece


def test_key_prior_original_never_targets_a_transposed_key():
    """``key_prior=original``: a transposed piece's KEY token is context, not a target; its notes and the
    other header tokens still are, and an untransposed piece's KEY is a target.  ``transposed`` targets all."""
    from armodal.modalities.music.data import _JSBTrainWindows

    seen = {"original": set(), "transposed": set()}
    for prior in seen:
        dm = ChoraleDataModule(str(CORPUS), batch_size=4, window_steps=32, stride_steps=16, hold_types=8,
                               start_prob=1.0, key_prior=prior)
        dm.setup()
        tok, train = dm.tokenizer, dm.splits["train"][:24]
        ds = _JSBTrainWindows(train, tok, 32, 5, 1.0, dm.untarget_when_transposed())
        for i in range(len(train)):
            for _ in range(3):
                item = ds[i]
                b = dm.collate([item])
                key = int(item[0][1])
                moved = key != tok.key_id(train[i].tonic, train[i].mode)  # the drawn shift moved the key
                assert b["loss_mask"][0, 1].item() == (prior == "transposed" or not moved)
                assert b["loss_mask"][0, 2:].all()  # METER, POS and every voice-step token stay targets
                seen[prior].add(moved)
    assert seen["original"] == {True, False}  # both cases were drawn
    with pytest.raises(ValueError, match="key_prior"):
        ChoraleDataModule(str(CORPUS), key_prior="orignal")


def test_default_experiment_is_the_chorale_grid(tmp_path):
    """``armodal-train`` with no arguments (``make demo``) trains the corpus chorale grid, sized for 2 cores."""
    from tests.conftest import compose_cfg

    cfg = compose_cfg("train", [], tmp_path)
    assert cfg.name == "music_chorales"
    assert cfg.modality.data._target_.endswith("ChoraleDataModule")
    assert Path(cfg.modality.data.path).resolve() == CORPUS.resolve()  # committed with the repo: no download
    assert cfg.trainer.max_time is not None  # a hard stop keeps the demo under 10 minutes
    # the unlikelihood term against parallel fifths / octaves is on, and the data supplies its sets
    assert cfg.module.unlikelihood_weight > 0 and cfg.modality.data.avoid.parallels > 0
