"""Silent corruption is refused: NaN weights, flipped bytes in a weight tensor, a tokenizer from elsewhere."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch

import armodal
from armodal.train import train
from armodal.training.checkpoint import CheckpointError, read_checkpoint, state_dict_sha256

SMALL = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "callbacks.samples.enabled=false", "logger=csv"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import SHRINK, compose_cfg

    tmp = tmp_path_factory.mktemp("integrity")
    m = train(compose_cfg("train", ["experiment=tokens_toy", f"modality.data.path={tmp / 'toy'}", *SHRINK, *SMALL], tmp))
    return Path(m["run_dir"])


def test_checkpoint_records_sha256_of_weights_and_tokenizer_files(run):
    ckpt = read_checkpoint(run / "checkpoints" / "best.ckpt")
    meta = ckpt["armodal"]
    assert meta["weights_sha256"] == state_dict_sha256(ckpt["state_dict"])
    assert set(meta["tokenizer_sha256"]) == {"tokenizer.json"} and len(meta["tokenizer_sha256"]["tokenizer.json"]) == 64
    armodal.load(run / "checkpoints" / "best.ckpt")  # verifies, and passes


def test_nan_weights_are_refused(run, tmp_path):
    ckpt = read_checkpoint(run / "checkpoints" / "best.ckpt")
    key = next(k for k in ckpt["state_dict"] if k.endswith("attn.wqkv.weight"))
    ckpt["state_dict"][key][0, 0] = float("nan")
    ckpt["armodal"]["weights_sha256"] = state_dict_sha256(ckpt["state_dict"])  # the hash alone would not notice
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=rf"{bad}: non-finite weights \(NaN/inf\) in {key}"):
        armodal.load(bad)


def _flip_byte_in_largest_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # torch stores tensor records uncompressed
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_weight_tensor_are_refused(run, tmp_path):
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes((run / "checkpoints" / "best.ckpt").read_bytes())
    _flip_byte_in_largest_tensor(bad)
    torch.load(bad, weights_only=True)  # torch itself reads the damaged file without complaint
    with pytest.raises(CheckpointError, match=rf"{bad}: the weights do not match their recorded SHA-256"):
        armodal.load(bad)
