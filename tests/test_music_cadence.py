"""The decoding rule ``cadences`` of the chorale grid (armodal.modalities.music.cadence): known answers on a
hand-written phrase in C major, agreement with the cadence count of the analysis, and decoding with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from armodal.modalities.music.analysis import _pc_weights, _root, cadences, key_of
from armodal.modalities.music.chorales import Chorale
from armodal.modalities.music.tokenizer import ChoraleTokenizer, JSBTokenizer

I, IV, V, ii = (72, 67, 64, 48), (72, 65, 60, 53), (71, 67, 62, 55), (74, 65, 62, 50)
V_NO_LT = (74, 67, 62, 55)  # G D G: the dominant without its leading tone B
TRIAD_C = {0, 3, 4, 7}


def _phrase(chords, fermata_from: int = 4) -> Chorale:
    """Quarter-note chords (S, A, T, B) in 4/4 from the downbeat, the soprano under a fermata from quarter
    ``fermata_from`` on."""
    grid = np.repeat(np.array(chords, dtype=float), 4, axis=0)
    fermata = np.zeros(len(grid), dtype=bool)
    fermata[fermata_from * 4 :] = True
    return Chorale("hand", grid, fermata, 0, "major", 16, 0)


def _flags(tok, ch: Chorale, step: int, voice: int) -> tuple[set[int], set[int]]:
    """(plain pitches, fermata pitches) flagged for the token of ``voice`` at ``step`` of ``ch``."""
    ids = tok.encode(ch)[None]
    p = int(tok.body_start(ids)) + 4 * step + voice
    f = tok.flagged_next(ids[:, :p], "cadences")[0]
    plain = {tok.low + i for i in torch.nonzero(f[tok.pitch0 : tok.fermata0]).flatten().tolist()}
    ferm = {tok.low + i for i in torch.nonzero(f[tok.fermata0 : tok.key0]).flatten().tolist()}
    assert not f[: tok.rest_id].any() and not f[tok.key0 :].any()  # pitch ids and the rest only
    assert f[tok.rest_id] == (voice > 0 and bool(plain))  # a rest under a cadence's fermata chord, with them
    return plain, ferm


def test_known_answers_on_a_phrase_in_c_major():
    tok = ChoraleTokenizer(hold_types=8)
    pitches = set(range(tok.low, tok.high + 1))
    off_triad = {p for p in pitches if p % 12 not in TRIAD_C}
    good = _phrase([I, IV, I, V, I])
    assert key_of(_pc_weights(good.grid[:16]).sum(0)) == (0, "major")
    assert cadences(good) == (1, 1)

    # soprano at the fermata step, after V with its leading tone: a fermata only on the tonic triad
    assert _flags(tok, good, 16, 0) == (set(), off_triad)
    # after IV it is a plagal cadence: the same
    assert _flags(tok, _phrase([I, V, I, IV, I]), 16, 0) == (set(), off_triad)
    # after ii, or a dominant without the leading tone, no fermata at all (the phrase goes on)
    for before in (ii, V_NO_LT):
        assert _flags(tok, _phrase([I, IV, I, before, I]), 16, 0) == (set(), pitches)
    # under a soprano fermata on the tonic triad: the bass only on the tonic, alto / tenor in the triad
    assert _flags(tok, good, 16, 3) == ({p for p in pitches if p % 12 != 0}, set())
    for voice in (1, 2):
        assert _flags(tok, good, 16, voice) == (off_triad, set())
    # a soprano fermata off the triad (D) cannot close on the tonic: nothing asked of the others
    d_top = _phrase([I, IV, I, V, (74, 67, 64, 48)])
    for voice in (1, 2, 3):
        assert _flags(tok, d_top, 16, voice) == (set(), set())
    # inside the fermata (its second step): nothing flagged; away from fermatas the soprano's fermata
    # pitches are judged (step 12 follows I at step 8: no fermata), plain pitches and the lower voices never
    for voice in range(4):
        assert _flags(tok, good, 17, voice) == (set(), set())
        assert _flags(tok, good, 12, voice) == (set(), pitches if voice == 0 else set())
    # the rule's phrase starts after the previous fermata: a second phrase in G major is judged in G
    two = Chorale("two", np.concatenate([good.grid, np.repeat(np.array(
        [(71, 67, 62, 55), (72, 66, 62, 57), (71, 67, 62, 55), (69, 66, 62, 50), (67, 62, 59, 55)], float), 4, 0)]),
        np.concatenate([good.fermata, [False] * 16, [True] * 4]), 0, "major", 16, 0)
    assert key_of(_pc_weights(two.grid[20:36]).sum(0)) == (7, "major")
    assert _flags(tok, two, 36, 3) == ({p for p in pitches if p % 12 != 7}, set())
    assert cadences(two) == (2, 2)


def test_the_bass_and_the_chord_before_are_the_counted_cadence():
    """What the rule asks of the bass and of the chord before is what ``analysis.cadences`` counts: every
    flagged bass note under the fermata turns the counted cadence into none, every unflagged one keeps it;
    a chord before that the soprano rule rejects is one the count rejects.  (Soprano, alto and tenor are
    asked for the tonic triad, which a V-I means; the count looks only at the root and the bass.)"""
    tok = ChoraleTokenizer(hold_types=8)
    good = _phrase([I, IV, I, V, I])
    flagged_bass, _ = _flags(tok, good, 16, 3)
    for b in range(40, 65):  # bass notes below the tenor's E4
        ch = _phrase([I, IV, I, V, (72, 67, 64, b)])
        assert cadences(ch) == (1, 0 if b in flagged_bass else 1), b
    for before in (V, IV, ii, V_NO_LT, (72, 67, 64, 48), (69, 65, 60, 53), (71, 65, 62, 55)):
        ch = _phrase([I, IV, I, before, I])
        _, ferm = _flags(tok, ch, 16, 0)
        assert (ferm != set(range(tok.low, tok.high + 1))) == (cadences(ch) == (1, 1)), before


def _satisfied(grid: np.ndarray, fermata: np.ndarray) -> tuple[int, int]:
    """(phrase endings, endings on the tonic triad in root position after V (leading tone) or IV of the
    key of the steps before), checked from the grid alone."""
    n = ok = 0
    start = 0
    for s in range(len(grid)):
        if not fermata[s] or (s and fermata[s - 1]):
            if s and fermata[s - 1] and not fermata[s]:
                start = s
            continue
        n += 1
        key = key_of(_pc_weights(grid[start:s]).sum(0))
        end, before = grid[s], grid[s - 4] if s >= 4 else None
        if key is None or before is None or np.isnan(end).any() or np.isnan(before).any():
            continue
        t = key[0]
        pcs = {int(p) % 12 for p in before}
        rb = _root(tuple(int(p) for p in before))
        cad = (rb == (t + 7) % 12 and (t + 11) % 12 in pcs) or rb == (t + 5) % 12
        ok += cad and int(end[3]) % 12 == t and all(int(p) % 12 in {(t + k) % 12 for k in (0, 3, 4, 7)} for p in end)
    return n, ok


def test_decoding_with_the_rule_and_refusals():
    """Prompted with I IV I V in C major and a soprano fermata on C, an untrained model harmonises the
    fermata anyhow; with ``rule_penalty={cadences: inf}`` that ending, and every later one it writes, is a
    tonic triad in root position after V or IV.  The JSB grid has no fermatas and refuses the rule by name."""
    from armodal.generation import GenerationConfig, UnsupportedSetting
    from tests.test_music_harmonize import tiny_model

    tok = ChoraleTokenizer(hold_types=8)
    model = tiny_model(tok, max_seq_len=260)
    ids = tok.encode(_phrase([I, IV, I, V, I]), eos=False)
    prompt = ids[: int(tok.body_start(ids[None])) + 4 * 16 + 1][None]  # up to the soprano's fermata C5
    assert prompt[0, -1] == tok.fermata0 + 72 - tok.low
    counts = {}
    for pen in (None, {"cadences": float("inf")}):
        out = model.generate(prompt, config=GenerationConfig(seed=0, rule_penalty=pen), num_samples=8)
        n = ok = 0
        for i in range(8):
            ch = tok.decode(out.ids[i, : out.lengths[i]])
            a, b = _satisfied(ch.grid, ch.fermata)
            n, ok = n + a, ok + b
        counts[str(pen)] = (n, ok)
    free, ruled = counts.values()
    assert free[0] >= 8 and free[1] < free[0] / 2, counts  # the untrained model closes the phrase anyhow
    assert ruled[0] >= 8 and ruled[1] == ruled[0], counts
    with pytest.raises(UnsupportedSetting, match="rule_penalty.*style rules parallels, crossings, not 'cadences'"):
        tiny_model(JSBTokenizer(hold_types=8), max_seq_len=80).generate(
            config=GenerationConfig(rule_penalty={"cadences": 1}), max_new_tokens=8)


def test_phrase_endings_mark_the_piano_roll():
    """``analysis.phrase_endings`` lists each ending with its verdict (``cadences`` is its count); the chorale
    sampler writes them above its piano rolls ("cad." where the ending is a counted cadence)."""
    from armodal.modalities.music.analysis import phrase_endings
    from armodal.modalities.music.sampler import _fermata_marks

    tok = ChoraleTokenizer(hold_types=8)
    good, bad = _phrase([I, IV, I, V, I]), _phrase([I, IV, I, ii, I])
    assert phrase_endings(good) == [(16, True)] and phrase_endings(bad) == [(16, False)]
    assert _fermata_marks(tok, tok.encode(good)) == [(4.0, "\u25bc cad.")]
    assert _fermata_marks(tok, tok.encode(bad)) == [(4.0, "\u25bc")]
    assert _fermata_marks(JSBTokenizer(hold_types=8), torch.tensor([1, 40, 40, 40, 40, 2])) is None


def test_harmonisation_looks_a_quarter_ahead_to_the_melody_fermata():
    """With the melody known, the chord a quarter before each of its fermatas (on the tonic triad) is asked
    to be V (the soprano on B: bass G, the others in G-B-D-F) or IV (soprano on A: bass F, the others in
    F-A-A♭-C); a soprano in neither, or no fermata ahead, asks nothing; free sampling never looks ahead.
    ``harmonize`` hands its melody to the rule."""
    from armodal.modalities.music import cadence
    from armodal.modalities.music.harmonize import harmonize, melody_from_chorale

    tok = ChoraleTokenizer(hold_types=8)
    pitches = set(range(tok.low, tok.high + 1))

    def ahead(ch: Chorale, step: int, voice: int) -> set[int]:
        ids = tok.encode(ch)[None]
        p = int(tok.body_start(ids)) + 4 * step + voice
        f = cadence.cadence_flags(tok, ids[:, :p], melody=melody_from_chorale(ch))[0]
        assert not f[tok.fermata0 :].any()
        return {tok.low + i for i in torch.nonzero(f[tok.pitch0 : tok.fermata0]).flatten().tolist()}

    good = _phrase([I, IV, I, V, I])
    assert ahead(good, 12, 3) == {p for p in pitches if p % 12 != 7}
    for voice in (1, 2):
        assert ahead(good, 12, voice) == {p for p in pitches if p % 12 not in {7, 11, 2, 5}}
    plagal = _phrase([I, V, I, (69, 65, 60, 53), I])  # soprano A a quarter before: IV
    assert ahead(plagal, 12, 3) == {p for p in pitches if p % 12 != 5}
    assert ahead(plagal, 12, 1) == {p for p in pitches if p % 12 not in {5, 8, 9, 0}}
    assert ahead(_phrase([I, IV, I, (76, 67, 60, 48), I]), 12, 3) == set()  # soprano E: neither chord
    assert ahead(good, 8, 3) == set()  # no fermata a quarter after step 8
    free = tok.encode(good)[None]
    p = int(tok.body_start(free)) + 4 * 12 + 3
    assert not cadence.cadence_flags(tok, free[:, :p])[0].any()  # free sampling: the future is unknown

    from armodal.generation import GenerationConfig
    from tests.test_music_harmonize import tiny_model

    seen = []
    real = cadence.cadence_flags

    def spy(tok_, ids, melody=None, offset=0):
        seen.append(melody is not None)
        return real(tok_, ids, melody=melody, offset=offset)

    cadence.cadence_flags = spy
    try:
        out = harmonize(tiny_model(tok, max_seq_len=260), melody_from_chorale(good), True,
                        GenerationConfig(seed=0, rule_penalty={"cadences": 3.0}), num_samples=2)
    finally:
        cadence.cadence_flags = real
    assert seen and all(seen)
    assert all(np.array_equal(tok.decode(o).grid[:, 0], good.grid[:, 0]) for o in out)
