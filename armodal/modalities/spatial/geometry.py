"""Spot geometry: spacing, spatial orders, windows over a section, and Moran's I.

Positions are handled in *spot-spacing units* (full-resolution pixels divided by the
median nearest-neighbour distance), so one code path serves legacy ST arrays (200 um
centre to centre), Visium (100 um, hexagonal) and user grids.

* :func:`spatial_order`: a fixed order of the spots of a window -- ``raster`` (rows top
  to bottom, left to right inside a row) or ``hilbert`` (a Hilbert space-filling curve
  over the half-spacing lattice, so consecutive spots stay close in 2D).
* :func:`knn_windows`: a window is the ``size`` spots nearest to a centre spot.
* :func:`cover`: windows that overlap and together contain every spot, and an *owner*
  window per spot -- the window in which the spot is nearest to the centre, i.e. has the
  most context.  A spot's prediction (each of its K samples) is taken from its owner
  window only, so every spot is predicted exactly once per sample.
* :func:`cell_index`: the 2D cell of a spot relative to its window centre, used as the
  spot's type id in window sequences.
* :func:`morans_i`: Moran's I of gene maps over the spots' neighbour graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

__all__ = [
    "ORDERS",
    "spot_spacing",
    "hilbert_index",
    "spatial_order",
    "knn_windows",
    "Cover",
    "cover",
    "cell_index",
    "n_cells",
    "neighbour_graph",
    "morans_i",
]

ORDERS = ("raster", "hilbert")


def spot_spacing(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance of spot centres ``xy`` [n, 2] (1.0 for a single spot)."""
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        return 1.0
    d, _ = cKDTree(xy).query(xy, k=2)
    s = float(np.median(d[:, 1]))
    if not np.isfinite(s) or s <= 0:
        raise ValueError(f"cannot estimate the spot spacing: median nearest-neighbour distance is {s}")
    return s


def hilbert_index(x: np.ndarray, y: np.ndarray, bits: int) -> np.ndarray:
    """Distance along the Hilbert curve of order ``bits`` (side 2**bits) of integer cells (x, y) >= 0.

    The classic iterative xy -> d conversion, vectorised; cells one step apart along the
    curve are 4-neighbours on the lattice.
    """
    x = np.asarray(x, dtype=np.int64).copy()
    y = np.asarray(y, dtype=np.int64).copy()
    n = 1 << bits
    if (x < 0).any() or (y < 0).any() or (x >= n).any() or (y >= n).any():
        raise ValueError(f"cells must lie in [0, {n})")
    d = np.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = ((x & s) > 0).astype(np.int64)
        ry = ((y & s) > 0).astype(np.int64)
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so that the sub-curve has the canonical orientation
        flip = ry == 0
        swap_x = flip & (rx == 1)
        x = np.where(swap_x, n - 1 - x, x)
        y = np.where(swap_x, n - 1 - y, y)
        x, y = np.where(flip, y, x), np.where(flip, x, y)
        s >>= 1
    return d


def _lattice(pos: np.ndarray) -> np.ndarray:
    """Integer cells on the half-spacing lattice [n, 2] (rows of a hexagonal array stay distinct)."""
    return np.round(np.asarray(pos, dtype=np.float64) * 2).astype(np.int64)


def spatial_order(pos: np.ndarray, kind: Literal["raster", "hilbert"] = "raster") -> np.ndarray:
    """A permutation of the spots ``pos`` [n, 2] (spacing units, y down) in the given order.

    Ties (two spots in one lattice cell) are broken by the exact position, then the index,
    so the order is a deterministic function of the positions.
    """
    pos = np.asarray(pos, dtype=np.float64)
    if len(pos) == 0:
        return np.zeros(0, np.int64)
    cell = _lattice(pos)
    idx = np.arange(len(pos))
    if kind == "raster":
        return np.lexsort((idx, pos[:, 0], cell[:, 0], cell[:, 1]))
    if kind == "hilbert":
        c = cell - cell.min(0)
        bits = max(1, int(np.ceil(np.log2(int(c.max()) + 1))))
        h = hilbert_index(c[:, 0], c[:, 1], bits)
        return np.lexsort((idx, pos[:, 0], pos[:, 1], h))
    raise ValueError(f"spatial order must be one of {ORDERS}, got {kind!r}")


def knn_windows(pos: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` spots nearest to each centre -> [m, size] spot indices (centre first).

    Sections with fewer than ``size`` spots give windows of all their spots.
    """
    pos = np.asarray(pos, dtype=np.float64)
    k = min(int(size), len(pos))
    if k < 1:
        raise ValueError("a window needs at least one spot")
    _, idx = cKDTree(pos).query(pos[np.asarray(centres)], k=k)
    return np.asarray(idx, dtype=np.int64).reshape(len(centres), k)


@dataclass
class Cover:
    """Windows covering a section.

    ``windows`` [m, size] spot indices; ``centres`` [m] the centre spot of each;
    ``owner`` [n] the window each spot is predicted from; ``slot`` [n] the spot's
    column in its owner window (``windows[owner[j], slot[j]] == j``).
    """

    windows: np.ndarray
    centres: np.ndarray
    owner: np.ndarray
    slot: np.ndarray


def cover(pos: np.ndarray, size: int, stride: float | None = None) -> Cover:
    """Overlapping k-NN windows that contain every spot, and each spot's owner window.

    Centres: the spots nearest to the points of a square lattice of step ``stride``
    (spacing units; default: the radius of a disc holding ``size`` spots, so neighbouring
    windows overlap by about half), then extra windows centred on any spot no window
    contains.  Owner: among the windows that contain a spot, the one whose centre is
    nearest (ties: the lower window index).  Deterministic in the positions.
    """
    pos = np.asarray(pos, dtype=np.float64)
    n = len(pos)
    if n == 0:
        raise ValueError("cannot cover a section without spots")
    size = min(int(size), n)
    if size == n:  # the whole section fits in one window
        w = knn_windows(pos, np.array([0]), size)
        slot = np.empty(n, np.int64)
        slot[w[0]] = np.arange(size)
        return Cover(w, np.array([0]), np.zeros(n, np.int64), slot)
    step = float(stride) if stride else max(1.0, float(np.sqrt(size / np.pi)))
    lo, hi = pos.min(0), pos.max(0)
    gx = np.arange(lo[0], hi[0] + step, step)
    gy = np.arange(lo[1], hi[1] + step, step)
    lattice = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
    tree = cKDTree(pos)
    dist, near = tree.query(lattice)
    near = near[dist <= step]  # lattice points outside the tissue place no window
    centres = list(dict.fromkeys(near.tolist()))  # unique, in lattice order
    windows = knn_windows(pos, np.array(centres), size)
    covered = np.zeros(n, bool)
    covered[windows.ravel()] = True
    while not covered.all():  # windows for spots no window contains
        j = int(np.flatnonzero(~covered)[0])
        w = knn_windows(pos, np.array([j]), size)
        centres.append(j)
        windows = np.concatenate([windows, w])
        covered[w[0]] = True
    centres = np.array(centres, np.int64)
    m = len(centres)
    member = np.zeros((m, n), bool)
    member[np.repeat(np.arange(m), size), windows.ravel()] = True
    d = np.linalg.norm(pos[None, :, :] - pos[centres][:, None, :], axis=-1)  # [m, n]
    d = np.where(member, d, np.inf)
    owner = d.argmin(0)
    slot = np.argmax(windows[owner] == np.arange(n)[:, None], axis=1)
    return Cover(windows, centres, owner.astype(np.int64), slot.astype(np.int64))


def n_cells(radius: int) -> int:
    """Number of distinct cells :func:`cell_index` returns for a window ``radius``."""
    return (2 * int(radius) + 1) ** 2


def cell_index(offset: np.ndarray, radius: int) -> np.ndarray:
    """Integer cell id in [0, n_cells(radius)) of offsets [..., 2] from the window centre (spacing
    units), rounded to the spot lattice and clipped to the square of half-side ``radius``."""
    c = np.clip(np.round(np.asarray(offset, dtype=np.float64)), -radius, radius).astype(np.int64) + int(radius)
    return c[..., 1] * (2 * int(radius) + 1) + c[..., 0]


# ----------------------------------------------------------------------------- Moran's I
def neighbour_graph(xy: np.ndarray, radius: float = 1.5) -> sp.csr_matrix:
    """Binary spatial weights: spots within ``radius`` spot spacings of each other (no self-loops)."""
    xy = np.asarray(xy, dtype=np.float64)
    pos = xy / spot_spacing(xy)
    pairs = cKDTree(pos).query_pairs(radius, output_type="ndarray")
    n = len(pos)
    if len(pairs) == 0:
        return sp.csr_matrix((n, n))
    i, j = pairs[:, 0], pairs[:, 1]
    w = sp.coo_matrix((np.ones(2 * len(pairs)), (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(n, n))
    return w.tocsr()


def morans_i(values: np.ndarray, weights: sp.spmatrix) -> np.ndarray:
    """Moran's I of each column of ``values`` [n, G] under spatial ``weights`` [n, n].

    I = (n / W) * sum_ij w_ij z_i z_j / sum_i z_i^2 with z the centred values and W the sum
    of the weights; NaN for a constant column.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    n = x.shape[0]
    w = sp.csr_matrix(weights, dtype=np.float64)
    if w.shape != (n, n):
        raise ValueError(f"weights are {w.shape}, values have {n} spots")
    total = w.sum()
    if total <= 0:
        raise ValueError("the neighbour graph has no edges: Moran's I is undefined")
    z = x - x.mean(0)
    den = (z**2).sum(0)
    num = (z * (w @ z)).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (n / total) * num / den
    return np.where(den > 1e-12, out, np.nan)
