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


def test_tokenizer_that_does_not_belong_to_the_checkpoint_is_refused(tmp_path):
    """A tokenizer.json edited so that every note comes out a semitone higher (same vocabulary size,
    so the weights still fit) is caught by the tokenizer hashes recorded in the checkpoint."""
    import json

    import numpy as np

    from armodal.modalities.base import load_tokenizer
    from tests.conftest import compose_cfg
    from tests.test_music import write_jsb

    write_jsb(tmp_path / "jsb_chorales" / "Jsb16thSeparated.npz")
    run = tmp_path / "run"
    train(compose_cfg("train", [
        "experiment=music_jsb", f"paths.data_dir={tmp_path}", f"run_dir={run}", "modality.data.window_steps=16",
        "modality.data.stride_steps=8", "model.max_seq_len=66", "model.d_model=32", "model.n_layer=1",
        "model.n_head=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "logger=csv", "callbacks.samples.enabled=false", "callbacks.progress.refresh_rate=0"], tmp_path))
    ckpt = run / "checkpoints" / "last.ckpt"
    model = armodal.load(ckpt)
    tok_file = run / "tokenizer" / "tokenizer.json"
    payload = json.loads(tok_file.read_text())
    payload["state"]["low"] += 1
    payload["state"]["high"] += 1
    tok_file.write_text(json.dumps(payload, indent=2))
    shifted = load_tokenizer(run / "tokenizer")  # on its own the edited file is a valid tokenizer ...
    assert shifted.vocab_size == model.tokenizer.vocab_size  # ... whose vocabulary still fits the weights
    grid = np.array([[72, 67, 64, 48]] * 4)
    ids = model.tokenizer.encode(grid)
    assert (np.asarray(shifted.decode(ids)) - np.asarray(model.tokenizer.decode(ids)) == 1).all()  # a semitone up
    with pytest.raises(CheckpointError, match=rf"{ckpt}: the tokenizer in .*tokenizer does not belong to this "
                                              r"checkpoint \(tokenizer.json differs\)"):
        armodal.load(ckpt)


# ----------------------------------------------------------------------------- the shareable export format
def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    from armodal.export import export
    from tests.conftest import compose_cfg

    return export(compose_cfg("export", [f"ckpt={ckpt}", f"out={out}", *extra]))


def test_export_writes_safetensors_config_tokenizer_manifest(run, tmp_path):
    out = _export(run / "checkpoints" / "best.ckpt", tmp_path / "export")
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert names == {"model.safetensors", "config.yaml", "tokenizer/tokenizer.json", "manifest.json", "README.md"}
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    assert manifest["format"] == "armodal-pretrained" and manifest["modality"] == "tokens"
    assert manifest["weights"]["tied"] == {"net.lm_head.weight": "net.tok_emb.weight"}  # stored once
    assert set(manifest["files"]) == names - {"manifest.json"}
    with pytest.raises(FileExistsError, match="overwrite=true"):
        _export(run / "checkpoints" / "best.ckpt", out)
    _export(run / "checkpoints" / "best.ckpt", out, "overwrite=true")
    from armodal.eval import evaluate
    from armodal.generate import generate
    from tests.conftest import compose_cfg

    g = generate(compose_cfg("generate", [f"ckpt={out}", "num_samples=2", f"out_dir={tmp_path / 'gen'}"]))
    assert g["num_samples"] == 2
    m = evaluate(compose_cfg("eval", [f"ckpt={out}", f"out={tmp_path / 'eval.json'}", "data.batch_size=8"]))
    assert m["val"]["tokens"] > 0


def test_export_loads_without_unpickling_anything(run, tmp_path, monkeypatch):
    import pickle

    ckpt = run / "checkpoints" / "best.ckpt"
    out = _export(ckpt, tmp_path / "export")
    ref = armodal.load(ckpt)

    def refuse(*a, **k):
        raise AssertionError("pickle used while loading an export")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, refuse)
    model = armodal.load(out)
    for k, v in ref.net.state_dict().items():
        torch.testing.assert_close(model.net.state_dict()[k], v, rtol=0, atol=0)
    prompt = torch.tensor([[ref.tokenizer.bos_id, 3, 5]])
    assert torch.equal(model.generate(prompt, max_new_tokens=8, strategy="greedy").ids,
                       ref.generate(prompt, max_new_tokens=8, strategy="greedy").ids)


def test_export_refuses_edited_files(run, tmp_path):
    ckpt = run / "checkpoints" / "best.ckpt"
    for rel, edit in [("model.safetensors", lambda b: b[:-7] + bytes([b[-7] ^ 1]) + b[-6:]),
                      ("tokenizer/tokenizer.json", lambda b: b.replace(b'"pad"', b'"pad" ', 1)),
                      ("config.yaml", lambda b: b + b"\nextra: 1\n")]:
        out = _export(ckpt, tmp_path / rel.replace("/", "_"))
        f = out / rel
        f.write_bytes(edit(f.read_bytes()))
        with pytest.raises(CheckpointError, match=rf"{out}: {rel} does not match its SHA-256 in manifest.json"):
            armodal.load(out)
    with pytest.raises(CheckpointError, match="a folder without manifest.json"):
        armodal.load(tmp_path)
