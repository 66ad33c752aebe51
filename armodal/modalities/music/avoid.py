"""Avoid sets for unlikelihood training on the four-voice grid: the pitches that would make a parallel
fifth or octave (rule ``parallels``), or cross the voice written just above (rule ``crossings``), given
the voices already written at this step.

The grid serialises each 16th step as ``S A T B``, so when voice ``v`` is predicted the voices above it
at this step (``u < v``) are known.  Voice ``v`` writing pitch ``c`` at step ``s`` makes a parallel
perfect interval with ``u`` when, from step ``s - 1`` (the sonority sounding just before; no voice
changes between two sonorities, so that is the previous sonority) to step ``s``:

* ``u`` and ``v`` stood a perfect fifth or an octave / unison apart (compound intervals included,
  the interval from ``v`` up to ``u`` taken mod 12 as in :func:`analysis.parallels`),
* both move (``c != prev_v``, ``cur_u != prev_u``) in the same direction, and
* ``cur_u - c`` is the same perfect interval mod 12.

That is exactly the pair rule :func:`armodal.modalities.music.analysis.parallels` counts (tested
against it).  ``crossings``: voice ``v`` writing a pitch above the pitch voice ``v - 1`` sounds at this
step, the rule :func:`armodal.modalities.music.analysis.crossings` counts.  Each pair ``u < v`` is decided at the lower voice's token, so the four voices' six pairs
are all covered.  The true continuation is never in its own avoid set: where Bach writes a parallel,
the data teaches it (unlikelihood training, Welleck et al. 2019, penalises only the *other* parallel
moves).  Computed from the (transposed) training window itself, so augmentation needs nothing extra.

:func:`next_flags` is the same rule for decoding: the pitches that voice would write next in breach of
a rule, given the sequence so far (the tokenizers' ``flagged_next``, behind ``rule_penalty``).
"""

from __future__ import annotations

import numpy as np
import torch

from armodal.modalities.music.grid import NUM_VOICES

__all__ = ["AVOID_RULES", "avoid_sets", "next_flags"]

PERFECT = (0, 7)  # octave / unison and fifth, mod 12
AVOID_RULES = ("parallels", "crossings")


def _row_crossings(grid: np.ndarray, low: int, high: int) -> np.ndarray:
    """grid [S, 4] -> bool [S, 4, P]: pitches above the voice written just above, at every step."""
    pitches = np.arange(low, high + 1, dtype=np.float64)
    out = np.zeros((len(grid), NUM_VOICES, len(pitches)), dtype=bool)
    for v in range(1, NUM_VOICES):
        above = grid[:, v - 1]
        out[:, v] = ~np.isnan(above)[:, None] & (pitches[None, :] > np.nan_to_num(above, nan=np.inf)[:, None])
        true = grid[:, v]
        hit = ~np.isnan(true)
        out[np.flatnonzero(hit), v, (true[hit] - low).astype(np.int64)] = False  # never the true continuation
    return out


def _row_avoid(grid: np.ndarray, low: int, high: int) -> np.ndarray:
    """grid [S, 4] (NaN = rest or unknown) -> bool [S, 4, P]: pitches (low..high) voice v must not write at
    step s because they make a parallel fifth / octave with a voice above."""
    steps = len(grid)
    pitches = np.arange(low, high + 1, dtype=np.float64)  # [P]
    out = np.zeros((steps, NUM_VOICES, len(pitches)), dtype=bool)
    if steps < 2:
        return out
    prev, cur = grid[:-1], grid[1:]  # [S-1, 4]
    for v in range(1, NUM_VOICES):
        moved_c = pitches[None, :] - prev[:, v, None]  # [S-1, P] motion of v to candidate c
        for u in range(v):
            interval = (prev[:, u] - prev[:, v]) % 12  # NaN where a voice rests
            motion_u = cur[:, u] - prev[:, u]
            ok = np.isin(interval, PERFECT) & (motion_u != 0) & ~np.isnan(motion_u)  # [S-1]
            same_dir = (moved_c != 0) & (np.sign(moved_c) == np.sign(motion_u)[:, None])
            same_int = ((cur[:, u, None] - pitches[None, :]) % 12) == interval[:, None]
            out[1:, v] |= ok[:, None] & same_dir & same_int
        true = cur[:, v]
        hit = ~np.isnan(true)
        idx = np.flatnonzero(hit)
        out[1 + idx, v, (true[hit] - low).astype(np.int64)] = False  # never the true continuation
    return out


_ROW_FNS = {"parallels": _row_avoid, "crossings": _row_crossings}


def next_flags(tok, ids: torch.Tensor, rule: str) -> torch.Tensor:
    """[B, t] ids of the JSB / chorale grid -> bool [B, V]: the pitches the next token would write in
    breach of ``rule`` (what :func:`avoid_sets` marks at that position, computed from the last two steps).
    Nothing is flagged for the soprano, outside the body, or at an EOS position."""
    if rule not in _ROW_FNS:
        raise ValueError(f"style rule {rule!r}: the four-voice grid's rules are {', '.join(AVOID_RULES)}")
    fn = _ROW_FNS[rule]
    b, t = ids.shape
    out = torch.zeros(b, tok.vocab_size, dtype=torch.bool)
    starts = tok.body_start(ids).tolist()
    pitch = tok.id_pitch(ids).numpy()
    n_p = tok.high - tok.low + 1
    for i in range(b):
        step, voice = divmod(t - starts[i], NUM_VOICES)
        if step < 0 or voice == 0:
            continue
        first = max(0, step - 1)  # the step before (the previous sonority) and this step so far
        grid = np.full((step - first + 1) * NUM_VOICES, np.nan)
        known = pitch[i, starts[i] + first * NUM_VOICES :]
        grid[: len(known)] = known
        flags = fn(grid.reshape(-1, NUM_VOICES), tok.low, tok.high)[-1, voice]  # [P]
        out[i, tok.num_specials : tok.num_specials + n_p] = torch.from_numpy(flags)
    return out.to(ids.device)


def avoid_sets(tok, ids: torch.Tensor, rules) -> torch.Tensor:
    """[B, T] ids of the JSB / chorale grid -> bool [B, T, V]: the union of the avoid sets of ``rules``
    (names in :data:`AVOID_RULES`) for each voice-step token."""
    bad = [r for r in rules if r not in AVOID_RULES]
    if bad or not rules:
        raise ValueError(f"avoid rules {list(rules)}: expected a non-empty list of {AVOID_RULES}")
    row_fns = [_ROW_FNS[r] for r in rules]
    b, t = ids.shape
    out = torch.zeros(b, t, tok.vocab_size, dtype=torch.bool)
    starts = tok.body_start(ids).tolist()
    pitch = tok.id_pitch(ids).numpy()  # [B, T] float, NaN for non-pitch ids
    n_p = tok.high - tok.low + 1
    for i in range(b):
        body = pitch[i, starts[i]:]
        steps = len(body) // NUM_VOICES
        if steps < 2:
            continue
        grid = body[: steps * NUM_VOICES].reshape(steps, NUM_VOICES)
        av = np.logical_or.reduce([fn(grid, tok.low, tok.high) for fn in row_fns])  # [S, 4, P]
        block = torch.from_numpy(av.reshape(steps * NUM_VOICES, n_p))
        out[i, starts[i] : starts[i] + steps * NUM_VOICES, tok.num_specials : tok.num_specials + n_p] = block
    return out
