"""The tokens modality's splits: the toy corpus holds out whole progressions, and a corpus
without test data has no test split (never val in its place)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from armodal.modalities.base import MissingSplitError
from armodal.modalities.tokens import TokensDataModule, write_toy_corpus


def _progressions(arr: np.ndarray, vocab: int) -> set[tuple[int, int]]:
    return {(int(r[0]), int((r[1] - r[0]) % vocab)) for r in arr}


def test_toy_corpus_splits_are_disjoint_progressions(tmp_path):
    d = write_toy_corpus(tmp_path / "toy")
    arrays = {s: np.load(d / f"{s}.npy") for s in ("train", "val", "test")}
    assert {s: a.shape for s, a in arrays.items()} == {"train": (512, 64), "val": (12, 64), "test": (12, 64)}
    for a in arrays.values():  # every row is an arithmetic progression mod 32 with step 1..3
        steps = np.diff(a, axis=1) % 32
        assert (steps == steps[:, :1]).all() and set(np.unique(steps)) <= {1, 2, 3}
    prog = {s: _progressions(a, 32) for s, a in arrays.items()}
    assert len(prog["val"]) == len(prog["test"]) == 12 and len(prog["train"]) == 72  # 96 = 3 steps x 32 starts
    assert not prog["train"] & prog["val"] and not prog["train"] & prog["test"] and not prog["val"] & prog["test"]
    assert json.loads((d / "vocab.json").read_text()) == {"vocab_size": 32, "toy_corpus": 2}


def test_no_test_file_means_no_test_split(tmp_path):
    d = write_toy_corpus(tmp_path / "toy", vocab_size=8, length=10, n_train=20)
    dm = TokensDataModule(str(d), seq_len=16, batch_size=4)
    dm.setup("fit")
    assert len(dm.test_dataloader().dataset) == 3 and len(dm.sequences("test")) == 3  # 24 progressions / 8
    (d / "test.npy").unlink()
    dm = TokensDataModule(str(d), seq_len=16, batch_size=4)
    dm.setup("test")
    with pytest.raises(MissingSplitError, match=f"{d}: no test split"):
        dm.test_dataloader()
    with pytest.raises(MissingSplitError, match="no 'test' split"):
        dm.sequences("test")


def test_make_toy_replaces_only_its_own_old_corpus(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):  # what version 1 wrote: overlapping progressions, no marker
        start, step = rng.integers(0, 32, (n, 1)), rng.integers(1, 4, (n, 1))
        np.save(d / f"{split}.npy", (start + step * np.arange(8)[None]) % 32)
    (d / "vocab.json").write_text(json.dumps({"vocab_size": 32}))
    TokensDataModule(str(d), make_toy=True).prepare_data()
    assert (d / "test.npy").is_file() and json.loads((d / "vocab.json").read_text())["toy_corpus"] == 2
    user = tmp_path / "user"
    user.mkdir()
    np.save(user / "train.npy", np.zeros((4, 8), np.int64))  # not progressions: someone's data
    (user / "vocab.json").write_text(json.dumps({"vocab_size": 32}))
    with pytest.raises(FileExistsError, match=f"{user}: make_toy=true, but .*toy_corpus=None, expected 2"):
        TokensDataModule(str(user), make_toy=True).prepare_data()
    assert not (user / "test.npy").exists()
    TokensDataModule(str(user), make_toy=False).prepare_data()  # used as it is
    fresh = TokensDataModule(str(tmp_path / "new"), make_toy=True)
    fresh.prepare_data()
    fresh.prepare_data()  # the current corpus is kept, not rewritten or refused
    assert (tmp_path / "new" / "test.npy").is_file()
