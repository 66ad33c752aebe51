"""Chorale grids from music21's corpus and the chorale metrics, on hand-written four-bar examples."""

from __future__ import annotations

import numpy as np
import pytest

from armodal.modalities.music.analysis import (
    bar_keys,
    cadences,
    chorale_metrics,
    compare_chorales,
    key_of,
    parallels,
    sonorities,
)
from armodal.modalities.music.chorales import Chorale, load_chorales, save_chorales


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
