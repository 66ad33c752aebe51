"""Window sequences: spatial autoregression across the spots of a window (TARIO-2 style).

A window is ``size`` spots of one section (a centre spot and its nearest spots, or the
whole section when it fits), put in a fixed spatial order (:func:`~.geometry.spatial_order`:
raster or Hilbert) in a frame centred on the centre spot.  Its sequence is

* prefix -- one H&E element per spot, in that order: the spot's patch feature and its 2D
  offset from the centre (the conditioner embeds both);
* tokens -- per spot, a *marker* token whose type id is the spot's 2D cell around the
  centre, then the spot's ``Q`` expression codes, typed by level.

``spot_key`` (``modality.data.spot_key``) says how the marker finds its own spot's H&E in the
prefix.  ``none``: only through the prefix's 2D offset embedding (the model must learn to match
a cell type to a Fourier offset).  ``cell``: the prefix element also gets a learned embedding of
the same cell id as the marker's type.  ``slot``: the marker's type is the spot's index in the
window order and its prefix element gets a learned embedding of that index (a fixed, small set of
keys, the same for every window and orientation).  The keys are ``cond["key"]`` [B, n].

So spot i's codes are predicted from all the H&E of the window and from the codes of
spots 1..i-1 (teacher forcing in training); the marker tells the model which spot comes
next, and carries no loss.  The transformer sees positions and spot identity only
through the prefix and the type stream.

Sampling (:func:`sample_windows`) generates spot by spot with the KV cache, ``K``
sequences per window; overlapping windows cover the section and each spot takes its K
samples from its *owner* window only (:func:`~.geometry.cover`), so every spot is
predicted exactly once per sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from armodal.modalities.spatial.geometry import cell_index, cover, spatial_order

__all__ = ["D8", "SPOT_KEYS", "window_cond", "window_keys", "window_layout", "window_tokens", "window_codes", "sample_windows"]

SPOT_KEYS = ("none", "cell", "slot")

D8 = np.array(  # the 8 symmetries of the square as 2x2 matrices (index 0: identity)
    [[[1, 0], [0, 1]], [[0, -1], [1, 0]], [[-1, 0], [0, -1]], [[0, 1], [-1, 0]],
     [[-1, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [0, -1]], [[0, -1], [-1, 0]]], dtype=np.float64)


def window_layout(pos: np.ndarray, window: np.ndarray, order: str, d8: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spots of one window in sequence order -> (spot indices [n], offsets from the centre [n, 2]).

    ``pos`` [N, 2]: the section's spot positions in spacing units; ``window`` [n]: spot indices,
    centre first; ``d8``: a symmetry of the square applied to the offsets before ordering
    (training augmentation: the same window in another orientation, hence another order).
    """
    window = np.asarray(window)
    off = (pos[window] - pos[window[0]]) @ D8[d8].T
    o = spatial_order(off, order)
    return window[o], off[o]


def window_keys(offsets: torch.Tensor | np.ndarray, tokenizer, spot_key: str = "none") -> torch.Tensor | None:
    """Offsets [B, n, 2] of windows in sequence order -> the spots' keys [B, n] (long), or None for ``none``.

    ``cell``: each spot's cell around the centre (the marker's type); ``slot``: its index in the order."""
    if spot_key not in SPOT_KEYS:
        raise ValueError(f"modality.data.spot_key must be one of {SPOT_KEYS}, got {spot_key!r}")
    off = np.asarray(offsets)
    if spot_key == "none":
        return None
    if spot_key == "slot":
        if off.shape[1] > tokenizer.n_cells:
            raise ValueError(f"spot_key=slot types a window's {off.shape[1]} spots by their index, but the type stream "
                             f"has {tokenizer.n_cells} marker types (window_radius={tokenizer.window_radius}): "
                             "raise modality.data.window_radius or use fewer spots per window")
        return torch.arange(off.shape[1]).expand(off.shape[0], off.shape[1])
    return torch.as_tensor(cell_index(off, tokenizer.window_radius))


def window_cond(feats: torch.Tensor, offsets: np.ndarray, tokenizer, spot_key: str = "none") -> dict:
    """The conditioner's input for windows: feats [B, n, F] and offsets [B, n, 2] (spacing units, sequence order)
    -> {"feats", "pos" (float32, on feats' device), "key" (with ``spot_key`` cell|slot)}."""
    cond = {"feats": feats, "pos": torch.as_tensor(np.asarray(offsets), dtype=torch.float32, device=feats.device)}
    keys = window_keys(offsets, tokenizer, spot_key)
    if keys is not None:
        cond["key"] = keys.to(feats.device)
    return cond


def window_tokens(spot_ids: torch.Tensor, offsets: torch.Tensor | np.ndarray, tokenizer,
                  spot_key: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Spot ids [B, n, Q] (level-offset ids, no pads) and offsets [B, n, 2] -> (ids, types), each [B, n * (Q + 1)].

    Per spot: the marker (type = its cell around the centre; with ``spot_key='slot'`` its index in the
    window order), then its Q ids (type = n_cells + level).
    """
    b, n, q = spot_ids.shape
    cells = window_keys(offsets, tokenizer, "slot" if spot_key == "slot" else "cell").to(spot_ids.device)  # [B, n]
    marker = torch.full((b, n, 1), tokenizer.marker_id, dtype=spot_ids.dtype, device=spot_ids.device)
    ids = torch.cat([marker, spot_ids], -1).reshape(b, n * (q + 1))
    level_types = tokenizer.n_cells + torch.arange(q, device=spot_ids.device).expand(b, n, q)
    types = torch.cat([cells[..., None].long(), level_types], -1).reshape(b, n * (q + 1))
    return ids, types


def window_codes(ids: torch.Tensor, n_levels: int) -> torch.Tensor:
    """ids [B, n * (Q + 1)] of window sequences -> spot ids [B, n, Q] (markers dropped)."""
    b, t = ids.shape
    if t % (n_levels + 1):
        raise ValueError(f"a window sequence has n * {n_levels + 1} tokens, got {t}")
    return ids.reshape(b, t // (n_levels + 1), n_levels + 1)[..., 1:]


@torch.no_grad()
def sample_windows(
    net,
    conditioner,
    tokenizer,
    feats: torch.Tensor,  # [N, F] plain patch features of the section's spots
    pos: np.ndarray,  # [N, 2] spot positions in spacing units
    num_samples: int,
    *,
    size: int,
    order: str,
    generate_fn,
    windows_per_batch: int | None = None,
    spot_key: str = "none",
    latent: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """K sampled spot ids of every spot -> ([N, K, Q], info).

    ``generate_fn(prefix [b, P, D], max_new_tokens, types_fn, num_return_sequences) -> ids [b*K, T]``
    runs the decoding engine (prefill of the H&E prefix, then one token at a time with the KV
    cache); windows of one batch are decoded together, K rows each (default: as many windows as fit
    in 4096 rows -- the per-token step cost is mostly fixed, so wide batches are cheaper).  Each spot's
    samples come from its owner window.  ``latent``: ``generate_fn`` also gets ``on_probs=`` (the engine's
    per-step distribution) and ``info["latent"]`` [N, K, D] holds, per sample, the sum over the spot's code
    levels of the *expected* codebook entry given the tokens before it (:class:`~.predict.LatentMean`).
    """
    net.eval()
    conditioner.eval()
    dev = next(net.parameters()).device
    n = len(pos)
    q = tokenizer.n_levels
    cov = cover(pos, size)
    windows_per_batch = windows_per_batch or max(1, 4096 // max(1, num_samples))
    out = torch.zeros((n, num_samples, q), dtype=torch.long)
    filled = torch.zeros(n, dtype=torch.long)
    values = torch.from_numpy(tokenizer.slot_values()).to(dev) if latent else None  # [Q, V, D]
    z_all = torch.zeros((n, num_samples, values.shape[-1])) if latent else None
    for a in range(0, len(cov.windows), windows_per_batch):
        rows = range(a, min(a + windows_per_batch, len(cov.windows)))
        lay = [window_layout(pos, cov.windows[w], order) for w in rows]
        spots = np.stack([s for s, _ in lay])  # [b, n_w]
        offs = np.stack([o for _, o in lay])  # [b, n_w, 2]
        prefix = conditioner(window_cond(feats[torch.as_tensor(spots)].to(dev).float(), offs, tokenizer, spot_key))  # [b, n_w, D]
        dummy = torch.zeros(spots.shape + (q,), dtype=torch.long, device=dev)
        _, types = window_tokens(dummy, offs, tokenizer, spot_key)  # [b, T]
        types = types.repeat_interleave(num_samples, 0)  # rows of one window are adjacent
        types_fn = lambda seq: types[:, : seq.shape[1]]  # noqa: E731
        if latent:
            acc = LatentMean(values, lambda t: (t // (q + 1), t % (q + 1) - 1), types.shape[0], spots.shape[1])
            ids = generate_fn(prefix, types.shape[1], types_fn, num_samples, on_probs=acc)  # [b*K, T]
            z = acc.z.to("cpu").reshape(len(rows), num_samples, spots.shape[1], -1)
        else:
            ids = generate_fn(prefix, types.shape[1], types_fn, num_samples)
        codes = window_codes(ids.to("cpu"), q).reshape(len(rows), num_samples, spots.shape[1], q)
        for i, w in enumerate(rows):
            own = cov.owner[spots[i]] == w  # [n_w]
            js = torch.as_tensor(spots[i][own])
            out[js] = codes[i][:, torch.as_tensor(own)].permute(1, 0, 2)
            if latent:
                z_all[js] = z[i][:, torch.as_tensor(own)].permute(1, 0, 2)
            filled[js] += 1
    if not bool((filled == 1).all()):
        raise RuntimeError(f"window cover predicted {int((filled != 1).sum())} spot(s) not exactly once")
    info = {"n_windows": int(len(cov.windows)), "window_size": int(cov.windows.shape[1])}
    return out, info | ({"latent": z_all} if latent else {})


class LatentMean:
    """``on_probs`` observer of a decode call that Rao-Blackwellises a code sample's decoded value.

    A spot's expression is ``decode_latent(sum over its slots of values[slot, id])`` (the tokenizer's
    :meth:`slot_values`).  At each slot this adds ``E[values[slot, id] | tokens so far]`` -- the drawn
    distribution times the value table -- instead of the value of the id drawn; by the tower property the
    sum has the same expectation as the sampled sum, with less variance (the draw of each level only
    enters through the later levels' context).  ``where(t) -> (spot, slot)`` maps the t-th generated
    token to its spot and slot (slot < 0: a token with no value, e.g. a window's spot marker).
    """

    def __init__(self, values: torch.Tensor, where, rows: int, spots: int, start: int = 0) -> None:
        self.values, self.where, self.start = values, where, start  # values [S, V, D]
        self.z = torch.zeros((rows, spots, values.shape[-1]), device=values.device)

    def __call__(self, seq: torch.Tensor, probs: torch.Tensor) -> None:
        spot, slot = self.where(seq.shape[1] - self.start)
        if slot >= 0:
            self.z[:, spot] += probs.float() @ self.values[slot]
