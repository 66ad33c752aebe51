"""Reading pre-tokenized sequences and serving fixed-length windows."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from armodal.modalities.base import MissingSplitError, register_datamodule
from armodal.modalities.tokens.tokenizer import TokensTokenizer
from armodal.training.resume import ResumableLoader

__all__ = ["TokensDataModule", "read_token_file", "write_toy_corpus", "WindowDataset", "TOY_CORPUS_VERSION"]


def read_token_file(path: str | Path, n_symbols: int, dtype: str = "uint16") -> list[np.ndarray]:
    """Sequences from ``.npy`` (1-D stream, or 2-D rows with negative padding) or raw ``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: token file not found")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ValueError(f"{path}: cannot read as a plain integer .npy ({e}); object arrays are refused") from None
    elif path.suffix == ".bin":
        arr = np.fromfile(path, dtype=np.dtype(dtype))
    else:
        raise ValueError(f"{path}: unsupported token file type {path.suffix!r} (use .npy or .bin)")
    if arr.dtype.kind == "f":
        if np.isnan(arr).any():
            raise ValueError(f"{path}: contains NaN; token files must hold integers")
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"{path}: contains non-integer values")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{path}: dtype {arr.dtype} is not an integer type")
    arr = arr.astype(np.int64)
    if arr.ndim == 1:
        seqs = [arr]
    elif arr.ndim == 2:
        seqs = [row[: np.argmax(row < 0)] if (row < 0).any() else row for row in arr]
    else:
        raise ValueError(f"{path}: expected a 1-D or 2-D array, got shape {arr.shape}")
    for i, s in enumerate(seqs):
        if s.size and s.max() >= n_symbols:
            raise ValueError(f"{path}: sequence {i} has token id {s.max()} >= vocab size {n_symbols}")
    empty = sum(1 for s in seqs if s.size == 0)
    if empty:
        warnings.warn(f"{path}: skipped {empty} empty sequence(s)")
    return [s for s in seqs if s.size]


TOY_CORPUS_VERSION = 2  # 2: train / val / test hold disjoint (start, step) progressions


def write_toy_corpus(directory: str | Path, vocab_size: int = 32, length: int = 64, n_train: int = 512,
                     heldout_fraction: float = 0.125, seed: int = 0) -> Path:
    """A learnable toy corpus: arithmetic progressions mod V (start 0..V-1, step 1..3).

    There are only ``3 V`` distinct progressions (96 for V=32), so the splits are made of disjoint
    (start, step) pairs: ``heldout_fraction`` of the pairs for val and as many for test (each pair
    once), the rest for train (``n_train`` sequences drawn from them).  Held-out progressions can
    only be predicted by the rule, not recalled.  ``vocab.json`` records ``toy_corpus``: the version.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pairs = np.array([(start, step) for start in range(vocab_size) for step in (1, 2, 3)])
    pairs = pairs[rng.permutation(len(pairs))]
    n_out = max(1, int(round(heldout_fraction * len(pairs))))
    if len(pairs) - 2 * n_out < 1:
        raise ValueError(f"toy corpus: {len(pairs)} progressions cannot give train plus {n_out} val and {n_out} test")
    splits = {"val": pairs[:n_out], "test": pairs[n_out : 2 * n_out], "train": pairs[2 * n_out :]}
    splits["train"] = splits["train"][rng.integers(0, len(splits["train"]), n_train)]

    for name, p in splits.items():  # [n, 2] (start, step) -> [n, length]
        np.save(directory / f"{name}.npy", ((p[:, :1] + p[:, 1:] * np.arange(length)[None]) % vocab_size).astype(np.int64))
    (directory / "vocab.json").write_text(json.dumps({"vocab_size": vocab_size, "toy_corpus": TOY_CORPUS_VERSION}))
    return directory


def _is_version_1_toy_corpus(directory: Path) -> bool:
    """The files version 1 of :func:`write_toy_corpus` wrote: vocab.json ``{"vocab_size": V}``, train
    and val .npy of progressions mod V with step 1..3, no test file."""
    try:
        vocab = json.loads((directory / "vocab.json").read_text())
        arrays = [np.load(directory / f"{s}.npy", allow_pickle=False) for s in ("train", "val")]
    except (OSError, ValueError):
        return False
    if set(vocab) != {"vocab_size"} or (directory / "test.npy").exists():
        return False
    v = vocab["vocab_size"]
    for a in arrays:
        steps = np.diff(a, axis=1) % v if a.ndim == 2 and a.shape[1] > 1 else None
        if steps is None or not ((steps == steps[:, :1]) & (steps >= 1) & (steps <= 3)).all():
            return False
    return True


class WindowDataset(Dataset):
    """Each sequence becomes BOS + seq + EOS, cut into windows of ``seq_len`` tokens (pad at the end)."""

    def __init__(self, seqs: list[np.ndarray], tok: TokensTokenizer, seq_len: int) -> None:
        self.tok, self.seq_len = tok, seq_len
        self.windows: list[np.ndarray] = []
        for s in seqs:
            full = np.concatenate([[tok.bos_id], s, [tok.eos_id]])
            for start in range(0, max(len(full) - 1, 1), seq_len):
                w = full[start : start + seq_len]
                if len(w) >= 2:
                    self.windows.append(w)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        w = self.windows[i]
        ids = torch.full((self.seq_len,), self.tok.pad_id, dtype=torch.long)
        ids[: len(w)] = torch.from_numpy(w)
        return {"ids": ids}


@register_datamodule("tokens")
class TokensDataModule(pl.LightningDataModule):
    """Pre-tokenized data in ``path``: ``train.{npy,bin}``, optional ``val``/``test``, and ``vocab.json``.

    Without a val file, ``val_fraction`` of the training sequences (chosen with ``seed``) are held out.
    Without a test file there is no test split: ``test_dataloader()`` raises :class:`MissingSplitError`
    (never val in its place).  ``make_toy=true`` writes the toy corpus into ``path`` first if it is missing.
    """

    def __init__(self, path: str, seq_len: int = 128, batch_size: int = 32, val_fraction: float = 0.1,
                 num_workers: int = 0, seed: int = 0, make_toy: bool = False, vocab: str | None = None) -> None:
        super().__init__()
        self.path, self.seq_len, self.batch_size = Path(path), seq_len, batch_size
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.make_toy, self.vocab_path = make_toy, Path(vocab) if vocab else None
        self.tokenizer: TokensTokenizer | None = None
        self._splits: dict[str, WindowDataset] = {}
        self._seqs: dict[str, list[np.ndarray]] = {}

    def prepare_data(self) -> None:
        if not self.make_toy:
            return
        vocab = self.path / "vocab.json"
        if not (self.path / "train.npy").exists():
            write_toy_corpus(self.path)
            return
        version = json.loads(vocab.read_text()).get("toy_corpus") if vocab.is_file() else None
        if version is None and _is_version_1_toy_corpus(self.path):  # our own old cache: safe to replace
            print(f"[armodal] {self.path}: replacing the version-1 toy corpus (train/val overlapped, no test split)")
            write_toy_corpus(self.path)
        elif version != TOY_CORPUS_VERSION:
            raise FileExistsError(
                f"{self.path}: make_toy=true, but the folder holds data that is not the current toy corpus "
                f"(vocab.json toy_corpus={version}, expected {TOY_CORPUS_VERSION}; version 1 shared progressions "
                "between train and val and had no test split). Delete the folder to regenerate it, or set "
                "make_toy=false to use the data as it is"
            )

    def _file(self, split: str) -> Path | None:
        for ext in (".npy", ".bin"):
            if (self.path / f"{split}{ext}").is_file():
                return self.path / f"{split}{ext}"
        return None

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: token data folder not found (set modality.data.path)")
        vocab_path = self.vocab_path or self.path / "vocab.json"
        self.tokenizer = TokensTokenizer.from_vocab_file(vocab_path)
        dtype = json.loads(vocab_path.read_text()).get("dtype", "uint16")
        train_file = self._file("train")
        if train_file is None:
            raise FileNotFoundError(f"{self.path}: no train.npy or train.bin")
        train = read_token_file(train_file, self.tokenizer.n_symbols, dtype)
        val_file, test_file = self._file("val"), self._file("test")
        if val_file is not None:
            val = read_token_file(val_file, self.tokenizer.n_symbols, dtype)
        else:
            order = np.random.default_rng(self.seed).permutation(len(train))
            n_val = max(1, int(round(self.val_fraction * len(train)))) if len(train) > 1 else 0
            val = [train[i] for i in order[:n_val]]
            train = [train[i] for i in order[n_val:]]
        self._seqs = {"train": train, "val": val}
        if test_file is not None:
            self._seqs["test"] = read_token_file(test_file, self.tokenizer.n_symbols, dtype)
        for split, seqs in self._seqs.items():
            self._splits[split] = WindowDataset(seqs, self.tokenizer, self.seq_len)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self._splits[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(self._splits["train"], batch_size=self.batch_size, shuffle=True,
                               num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        if "test" not in self._splits:
            raise MissingSplitError(f"{self.path}: no test split (no test.npy or test.bin in the folder)")
        return self._loader("test", False)

    def sequences(self, split: str) -> list[np.ndarray]:
        """The whole symbol sequences of a split (no BOS/EOS, not windowed), for evaluators."""
        self.setup()
        if split not in self._seqs:
            raise MissingSplitError(f"{self.path}: no {split!r} split (have {sorted(self._seqs)})")
        return self._seqs[split]
