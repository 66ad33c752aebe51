"""Spot geometry: Hilbert / raster orders, window covers (every spot predicted exactly once), cells,
and Moran's I against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from armodal.modalities.spatial.geometry import (
    cell_index,
    cover,
    hilbert_index,
    knn_windows,
    morans_i,
    n_cells,
    neighbour_graph,
    spatial_order,
    spot_spacing,
)


def _grid(nx: int, ny: int, jitter: float = 0.0, hexagonal: bool = False, seed: int = 0) -> np.ndarray:
    x, y = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float))
    if hexagonal:  # Visium: odd rows shifted by half a spacing, rows sqrt(3)/2 apart
        x = x + 0.5 * (np.arange(ny)[:, None] % 2)
        y = y * np.sqrt(3) / 2
    pos = np.stack([x.ravel(), y.ravel()], 1)
    return pos + np.random.default_rng(seed).normal(0, jitter, pos.shape)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_hilbert_curve_visits_every_cell_once_in_unit_steps(bits):
    n = 1 << bits
    x, y = np.meshgrid(np.arange(n), np.arange(n))
    d = hilbert_index(x.ravel(), y.ravel(), bits)
    assert sorted(d.tolist()) == list(range(n * n))
    o = np.argsort(d)
    steps = np.abs(np.diff(x.ravel()[o])) + np.abs(np.diff(y.ravel()[o]))
    assert (steps == 1).all()
    # the order-1 curve: (0,0) -> (0,1) -> (1,1) -> (1,0)
    assert hilbert_index(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 0]), 1).tolist() == [0, 1, 2, 3]


def test_raster_order_reads_rows_top_to_bottom():
    pos = _grid(5, 4, jitter=0.05)
    o = spatial_order(pos, "raster")
    rows = np.round(pos[o, 1])
    assert (np.diff(rows) >= 0).all()
    for r in range(4):
        xs = pos[o][rows == r, 0]
        assert (np.diff(xs) > 0).all()
    # a hexagonal array keeps its rows apart
    hexa = _grid(6, 5, hexagonal=True)
    oh = spatial_order(hexa, "raster")
    assert (np.diff(hexa[oh, 1]) >= -1e-9).all()


@pytest.mark.parametrize("kind", ["raster", "hilbert"])
def test_orders_are_deterministic_permutations(kind):
    pos = _grid(9, 7, jitter=0.1, seed=3)
    o = spatial_order(pos, kind)
    assert sorted(o.tolist()) == list(range(len(pos)))
    np.testing.assert_array_equal(spatial_order(pos[::-1], kind), len(pos) - 1 - o)  # order of the positions, not the indices


def test_hilbert_order_keeps_consecutive_spots_closer_than_raster():
    pos = _grid(8, 8)
    gap = {k: np.linalg.norm(np.diff(pos[spatial_order(pos, k)], axis=0), axis=1) for k in ("raster", "hilbert")}
    assert gap["hilbert"].max() == pytest.approx(1.0)  # a full 8x8 lattice: every step is one spacing
    assert gap["raster"].max() > 7  # raster jumps back at every row end


def test_unknown_order_is_refused():
    with pytest.raises(ValueError, match="raster"):
        spatial_order(_grid(2, 2), "zigzag")


@pytest.mark.parametrize("shape,size,hexagonal", [((12, 10), 20, False), ((7, 9), 30, True), ((3, 3), 30, False),
                                                  ((15, 4), 7, False)])
def test_cover_predicts_every_spot_exactly_once(shape, size, hexagonal):
    pos = _grid(*shape, jitter=0.08, hexagonal=hexagonal)
    pos = pos[np.random.default_rng(1).random(len(pos)) > 0.15]  # holes, like tissue
    c = cover(pos, size)
    n = len(pos)
    assert c.owner.shape == (n,) and c.windows.shape[1] == min(size, n)
    # each spot sits in its owner window at its slot, and the (owner, slot) pairs are distinct
    np.testing.assert_array_equal(c.windows[c.owner, c.slot], np.arange(n))
    assert len(set(zip(c.owner.tolist(), c.slot.tolist()))) == n
    # taking each window's output only at the slots it owns yields every spot exactly once
    taken = np.zeros(n, int)
    for w in range(len(c.windows)):
        mine = c.owner[c.windows[w]] == w
        np.add.at(taken, c.windows[w][mine], 1)
    assert (taken == 1).all()
    # owner = the containing window with the nearest centre
    for j in range(n):
        containing = [w for w in range(len(c.windows)) if j in c.windows[w]]
        d = [np.linalg.norm(pos[j] - pos[c.centres[w]]) for w in containing]
        assert np.linalg.norm(pos[j] - pos[c.centres[c.owner[j]]]) == pytest.approx(min(d))
    if size >= n:
        assert len(c.windows) == 1


def test_knn_window_is_centre_and_its_nearest_spots():
    pos = _grid(5, 5)
    w = knn_windows(pos, np.array([12]), 5)[0]  # centre of the 5x5 grid
    assert w[0] == 12 and sorted(w[1:].tolist()) == [7, 11, 13, 17]


def test_cells_round_and_clip():
    assert n_cells(2) == 25
    off = np.array([[0.0, 0.0], [1.1, -0.9], [-7.0, 3.0]])
    c = cell_index(off, 2)
    assert c.tolist() == [2 * 5 + 2, 1 * 5 + 3, 4 * 5 + 0]
    assert spot_spacing(_grid(4, 4) * 271.4) == pytest.approx(271.4)


def test_morans_i_known_values():
    pos = _grid(6, 6)
    w_rook = neighbour_graph(pos, radius=1.1)  # 4-neighbours
    assert w_rook.sum() == 2 * (2 * 6 * 5)  # 60 edges, both directions
    checker = ((pos[:, 0] + pos[:, 1]) % 2)[:, None] * 2.0 - 1.0
    np.testing.assert_allclose(morans_i(checker, w_rook), [-1.0])  # every neighbour pair disagrees
    halves = (pos[:, 0] >= 3).astype(float)[:, None]
    # left/right halves: of the 60 rook edges 6 cross the border (z_i z_j = -1), 54 do not (+1)
    np.testing.assert_allclose(morans_i(halves, w_rook), [(36 / 120) * 2 * (54 - 6) / 36])
    assert np.isnan(morans_i(np.ones((36, 1)), w_rook)[0])
    # agrees with scanpy's implementation on a random map
    import scanpy as sc

    vals = np.random.default_rng(0).normal(size=(36, 3))
    w8 = neighbour_graph(pos, radius=1.5)
    np.testing.assert_allclose(morans_i(vals, w8), sc.metrics.morans_i(w8, vals.T), atol=1e-8)
