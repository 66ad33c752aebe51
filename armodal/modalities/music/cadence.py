"""The decoding rule ``cadences`` of the chorale grid: close each phrase with a V-I or IV-I cadence.

Bach ends about half of his phrases (the soprano notes under a fermata) with an authentic or plagal
cadence in the phrase's key; a sampled chorale ends far fewer that way, because by the time the soprano
writes its fermata the chord before is already there.  The rule says, token by token, which next tokens
would break the cadence, with exactly the definition :func:`armodal.modalities.music.analysis.cadences`
counts (the chord a quarter before the fermata chord, roots from music21), with the phrase's key read
from the steps since the previous fermata up to the fermata chord (the count also weighs the fermata chord,
which the rule makes the tonic triad):

* **soprano**, at a step that would start a fermata (the step before has none): a fermata pitch is
  flagged when the chord a quarter before (step ``s - 4``) is neither V with the leading tone nor IV of
  the phrase's key, or when the pitch is not in the tonic triad (either third, so a Picardy ending
  counts).  Plain pitches are never flagged: the phrase simply goes on.
* **alto, tenor, bass** under a soprano that starts a fermata: pitches off the tonic triad are flagged
  (for the bass: anything but the tonic, so the chord stands in root position) when the soprano itself
  sits in the triad, and so is a rest (the chord sounds in all four voices); otherwise the ending cannot
  be a cadence and nothing is flagged.
* **harmonisation** (the melody and its fermatas given in advance, :func:`armodal.modalities.music.harmonize.harmonize`):
  also a quarter *before* each fermata on the tonic triad, alto / tenor / bass off V (with its seventh) or IV
  — whichever holds the soprano's note there — are flagged, the bass off that chord's root.

``rule_penalty={cadences: nats}`` lowers those logits (:mod:`armodal.generation.processors`).  Everything
is read from the tokens so far (and, in harmonisation, from the given melody), so it is a decoding preference and not
a feature of the model: the NLL the model is scored by does not change.
"""

from __future__ import annotations

import numpy as np
import torch

from armodal.modalities.music.analysis import _pc_weights, cadential_approach, key_of
from armodal.modalities.music.grid import NUM_VOICES

__all__ = ["cadence_flags", "tonic_triad"]


def tonic_triad(tonic: int) -> set[int]:
    """Pitch classes of the tonic triad with either third (major or minor, a Picardy third included)."""
    return {tonic % 12, (tonic + 3) % 12, (tonic + 4) % 12, (tonic + 7) % 12}


def _phrase_tonic(grid: np.ndarray, fermata: np.ndarray, step: int) -> int | None:
    """Tonic of the phrase's key: the steps since the previous fermata, up to (not with) ``step``."""
    ends = np.flatnonzero(fermata[:step] & ~np.append(fermata[1:step], False)) if step else np.array([], int)
    start = int(ends[-1]) + 1 if len(ends) else 0
    key = key_of(_pc_weights(grid[start:step]).sum(0))
    return None if key is None else key[0]


def _approach(grid: np.ndarray, fermata: np.ndarray, step: int, voice: int, pcs: np.ndarray,
              soprano_then: float) -> np.ndarray | None:
    """Harmonisation look-ahead: the melody puts a fermata a quarter after ``step`` with ``soprano_then``
    on it.  Flags [P] for alto / tenor / bass at ``step`` that keep the chord from being V (root G in C, the
    leading tone and a seventh allowed) or IV (root F), whichever the soprano at ``step`` belongs to."""
    tonic = _phrase_tonic(grid, fermata, step)
    soprano = grid[step, 0]
    if tonic is None or np.isnan(soprano) or np.isnan(soprano_then) or int(soprano_then) % 12 not in tonic_triad(tonic):
        return None
    chords = (((tonic + 7) % 12, {(tonic + k) % 12 for k in (7, 11, 2, 5)}),  # V(7)
              ((tonic + 5) % 12, {(tonic + k) % 12 for k in (5, 8, 9, 0)}))  # IV (iv)
    for root, tones in chords:
        if int(soprano) % 12 in tones:
            return pcs != root if voice == NUM_VOICES - 1 else ~np.isin(pcs, list(tones))
    return None


def _one(grid: np.ndarray, fermata: np.ndarray, step: int, voice: int, low: int, n_p: int,
         ahead: tuple[bool, float] | None = None) -> tuple[str, np.ndarray] | None:
    """(which ids, bool [P] flags over pitches low..) for the next token of one sequence, or None.
    ``ahead``: (a fermata run starts a quarter after ``step``, the soprano pitch there), when the melody is
    known in advance (harmonisation)."""
    if step >= 1 and fermata[step - 1]:
        return None  # inside a fermata run: the ending chord is already written
    pcs = np.arange(low, low + n_p) % 12
    if voice > 0 and not fermata[step]:
        if ahead is not None and ahead[0]:
            flags = _approach(grid, fermata, step, voice, pcs, ahead[1])
            return None if flags is None else ("pitch", flags)
        return None
    tonic = _phrase_tonic(grid, fermata, step)  # the phrase so far, before the fermata chord
    if tonic is None:
        return None
    triad = tonic_triad(tonic)
    in_triad = np.isin(pcs, list(triad))
    if voice == 0:
        before = grid[step - 4] if step >= 4 else None
        if before is None or np.isnan(before).any() or not cadential_approach(tuple(int(p) for p in before), tonic):
            return "fermata", np.ones(len(pcs), dtype=bool)
        return "fermata", ~in_triad
    soprano = grid[step, 0]
    if np.isnan(soprano) or int(soprano) % 12 not in triad:
        return None
    if voice == NUM_VOICES - 1:
        return "pitch", pcs != tonic % 12
    return "pitch", ~in_triad


def cadence_flags(tok, ids: torch.Tensor, melody=None, offset: int = 0) -> torch.Tensor:
    """[B, t] ids of the chorale grid -> bool [B, V]: the next tokens that would keep the phrase ending
    being written from a V-I / IV-I cadence in the phrase's key (see the module docstring).

    ``melody`` (a :class:`Chorale` whose soprano and fermatas are given, harmonisation): the rule also
    looks a quarter ahead and asks the chord before each of the melody's fermatas to be V or IV;
    ``offset``: the melody step of the sequence's first step (a later harmonisation window)."""
    b, t = ids.shape
    n_p = tok.high - tok.low + 1
    out = torch.zeros(b, tok.vocab_size, dtype=torch.bool)
    starts = tok.body_start(ids).tolist()
    pitch = tok.id_pitch(ids).numpy()
    is_ferm = ((ids >= tok.fermata0) & (ids < tok.key0)).numpy()
    mf = None if melody is None else np.asarray(melody.fermata, dtype=bool)
    for i in range(b):
        step, voice = divmod(t - starts[i], NUM_VOICES)
        if step < 0:
            continue
        cells = np.full((step + 1) * NUM_VOICES, np.nan)
        known = pitch[i, starts[i] :]
        cells[: len(known)] = known
        fermata = np.zeros(step + 1, dtype=bool)
        sop = is_ferm[i, starts[i] :: NUM_VOICES][: step + 1]
        fermata[: len(sop)] = sop
        ahead = None
        if mf is not None:
            m = offset + step + 4  # the melody step a quarter ahead
            ahead = (bool(m < len(mf) and mf[m] and not mf[m - 1]), float(melody.grid[m, 0]) if m < len(mf) else np.nan)
        got = _one(cells.reshape(-1, NUM_VOICES), fermata, step, voice, tok.low, n_p, ahead)
        if got is None:
            continue
        which, flags = got
        first = tok.fermata0 if which == "fermata" else tok.pitch0
        out[i, first : first + n_p] = torch.from_numpy(flags)
        if which == "pitch":
            out[i, tok.rest_id] = True  # a cadence chord sounds in all four voices
    return out.to(ids.device)
