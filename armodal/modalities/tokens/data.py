"""Reading pre-tokenized sequences and serving fixed-length windows."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from armodal.modalities.base import register_datamodule
from armodal.modalities.tokens.tokenizer import TokensTokenizer

__all__ = ["TokensDataModule", "read_token_file", "write_toy_corpus", "WindowDataset"]


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


def write_toy_corpus(directory: str | Path, vocab_size: int = 32, length: int = 64, n_train: int = 512,
                     n_val: int = 64, seed: int = 0) -> Path:
    """A learnable toy corpus: arithmetic progressions mod V (random start, step 1..3)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def make(n):
        start = rng.integers(0, vocab_size, n)[:, None]
        step = rng.integers(1, 4, n)[:, None]
        return ((start + step * np.arange(length)[None]) % vocab_size).astype(np.int64)

    np.save(directory / "train.npy", make(n_train))
    np.save(directory / "val.npy", make(n_val))
    (directory / "vocab.json").write_text(json.dumps({"vocab_size": vocab_size}))
    return directory


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
    ``make_toy=true`` writes the toy corpus into ``path`` first if it is missing.
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
        if self.make_toy and not (self.path / "train.npy").exists():
            write_toy_corpus(self.path)

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
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test" if "test" in self._splits else "val", False)

    def sequences(self, split: str) -> list[np.ndarray]:
        """The whole symbol sequences of a split (no BOS/EOS, not windowed), for evaluators."""
        self.setup()
        if split == "test" and "test" not in self._seqs:
            split = "val"
        if split not in self._seqs:
            raise KeyError(f"{self.path}: no {split!r} split (have {sorted(self._seqs)})")
        return self._seqs[split]
