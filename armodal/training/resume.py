"""What a killed run needs to continue exactly where it stopped.

Lightning restores weights, optimizer, scheduler and loop counters from ``last.ckpt``.  Two more
things decide what the next steps compute, and a plain restart gets both wrong:

* the data order: a shuffled ``DataLoader`` draws its permutation from the global RNG and starts
  the epoch again from its first batch.  :class:`ResumableLoader` fixes each epoch's order by
  ``(seed, epoch)`` and, being stateful, tells Lightning how many batches of the epoch were served,
  so a resumed run skips exactly those (their indices only: nothing is loaded);
* the random number generators (dropout, label dropout, augmentation): :func:`rng_states` /
  :func:`set_rng_states` save and restore them with the checkpoint, in a form
  ``torch.load(weights_only=True)`` reads.

A resumed run then matches the uninterrupted run of the same seed (tests/test_core_train.py).
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochSampler", "ResumableLoader", "rng_states", "set_rng_states"]


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``: in order, or shuffled by a permutation fixed by ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every epoch; the order never depends on the global RNG.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class _Skip:
    """An index (batch) sampler without its first ``n`` items."""

    def __init__(self, base, n: int) -> None:
        self.base, self.n = base, n

    def __iter__(self):
        it = iter(self.base)
        for _ in range(self.n):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(0, len(self.base) - self.n)


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` that Lightning checkpoints mid-epoch and resumes exactly.

    ``shuffle`` orders batches by :class:`EpochSampler` with ``seed`` (default: the run's seed); a
    ``sampler`` passed in (the ``DistributedSampler`` Lightning injects under DDP) is used as it is.
    ``state_dict()`` holds the epoch and the number of batches served in it; after
    ``load_state_dict()`` the next pass over that epoch leaves those batches out.  Worker seeds come
    from the loader's own generator.  With ``num_workers=0`` a resumed run is exact; with workers the
    batches are the same but random augmentation inside workers is not replayed.
    """

    def __init__(self, dataset: Dataset, batch_size: int = 1, shuffle: bool = False, sampler=None,
                 seed: int | None = None, **kwargs: Any) -> None:
        if seed is None:  # the run's seed (train() seeds everything before building the loaders)
            seed = torch.initial_seed() % 2**31
        if sampler is None:
            sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
        if kwargs.get("generator") is None:
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.seed = seed
        self._served, self._served_epoch = 0, None
        self._resume: tuple[int | None, int] = (None, 0)  # (epoch, batches already served in it)
        self._skip_now = 0

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    @property
    def _index_sampler(self):  # read once by every new iterator
        base = super()._index_sampler
        return _Skip(base, self._skip_now) if self._skip_now else base

    def __iter__(self):
        epoch = self._epoch()
        skip = self._resume[1] if epoch is not None and self._resume[0] == epoch else 0
        self._resume = (None, 0)
        self._skip_now = skip
        try:
            it = super().__iter__()
        finally:
            self._skip_now = 0
        self._served, self._served_epoch = skip, epoch
        for batch in it:
            self._served += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._served_epoch, "batches": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (state.get("epoch"), int(state.get("batches", 0)))


# ----------------------------------------------------------------------------- random number generators
def rng_states() -> dict:
    """The torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain numbers."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only where the devices match)."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
