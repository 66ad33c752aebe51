"""Distillation on JSB (issue 17, item 4): a teacher's soft targets for the training tokens
(``scripts/jsb_distill_targets.py``), carried by the training batches with each window's
transposition (``modality.data.soft_targets``), mixed into the loss by the LightningModule
(``module.distill_weight``); and ``init_from=`` (start a run from another run's weights)."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import armodal
from armodal.modalities.music.data import (
    ChoraleDataModule,
    JSBDataModule,
    grids_fingerprint,
    load_jsb,
    load_soft_targets,
    transpose_soft_rows,
)
from armodal.modalities.music.grid import NUM_VOICES
from armodal.modalities.music.jsb_ensemble import transposition_ensemble_nll
from armodal.models import Transformer, TransformerConfig
from armodal.training import ARLitModule
from armodal.training.checkpoint import CheckpointError
from armodal.training.loss import soft_target_sums
from armodal.utils.config import ROOT_DIR
from tests.conftest import compose_cfg
from tests.test_music import write_jsb

SHIFTS = [-2, -1, 0, 1, 2]


def _script():
    spec = importlib.util.spec_from_file_location("jsb_distill_targets", ROOT_DIR / "scripts" / "jsb_distill_targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dm(path, soft=None, **kw):
    dm = JSBDataModule(str(path), batch_size=4, window_steps=16, stride_steps=8, beat_types=True, hold_types=4,
                       soft_targets=soft, **kw)
    dm.setup("fit")
    return dm


def _net(tok, seed=0, max_seq_len=66):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=tok.vocab_size, num_types=tok.num_types, d_model=32, n_head=2,
                                         n_layer=1, max_seq_len=max_seq_len)).eval()


def _one_hot_targets(dm, path):
    """A perfect teacher: each training token's own one-hot, written in the script's file format."""
    tok = dm.tokenizer
    arrays = {}
    for i, g in enumerate(dm.pieces("train")):
        ids = tok.pitch_to_id(g)  # [steps, 4]
        arrays[f"piece_{i}"] = np.eye(tok.vocab_size, dtype=np.float16)[ids]
    arrays["fingerprint"] = np.array(grids_fingerprint(dm.pieces("train")))
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------- the loss
def test_soft_target_loss_is_the_cross_entropy_against_the_mixed_target():
    torch.manual_seed(0)
    b, t, v = 2, 7, 6
    logits = torch.randn(b, t, v)
    ids = torch.randint(0, v, (b, t))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3] = False
    q = torch.softmax(torch.randn(b, t, v), -1)
    q[1, 5] = 0  # this token has no soft target: it keeps its one-hot target
    soft_ce, hard = soft_target_sums(logits, ids, q, 0, mask)
    logp = logits[:, :-1].log_softmax(-1)
    sel = mask[:, 1:] & (q[:, 1:].sum(-1) > 0)
    assert torch.allclose(soft_ce, -(q[:, 1:] * logp).sum(-1)[sel].sum())
    assert torch.allclose(hard, -logp.gather(-1, ids[:, 1:, None])[..., 0][sel].sum())
    same, _ = soft_target_sums(logits, ids, F.one_hot(ids, v).float(), 0, mask)  # one-hot soft = the plain NLL
    assert torch.allclose(same, -logp.gather(-1, ids[:, 1:, None])[..., 0][mask[:, 1:]].sum())
    # a zero-probability pitch under a -inf logit adds 0, never nan
    inf = logits.clone()
    inf[..., 0] = -math.inf
    q0 = q.clone()
    q0[..., 0] = 0
    assert torch.isfinite(soft_target_sums(inf, ids.clamp_min(1), q0, 0, mask)[0])


def test_distill_weight_mixes_the_targets_and_is_checked_both_ways(tmp_path):
    dm = _dm(write_jsb(tmp_path / "jsb.npz"))
    soft_file = _one_hot_targets(dm, tmp_path / "soft.npz")
    dm_soft = _dm(tmp_path / "jsb.npz", soft=str(soft_file))
    torch.manual_seed(3)
    batch = next(iter(dm_soft.train_dataloader()))
    net = _net(dm.tokenizer).train()
    plain = ARLitModule(net, tokenizer=dm.tokenizer)
    plain.log = lambda *a, **k: None
    want = plain.training_step({k: v for k, v in batch.items() if k != "soft_targets"}, 0)
    for w in (0.3, 1.0):  # a one-hot teacher: distillation at any weight is the plain loss
        mod = ARLitModule(net, tokenizer=dm.tokenizer, distill_weight=w)
        mod.log = lambda *a, **k: None
        assert torch.allclose(mod.training_step(batch, 0), want, atol=1e-5)
    # a uniform teacher over the vocabulary: loss = (1 - w) NLL + w * mean cross-entropy to uniform
    uni = dict(batch, soft_targets=(batch["soft_targets"].sum(-1, keepdim=True) > 0).float()
               .expand_as(batch["soft_targets"]) / batch["soft_targets"].shape[-1])
    mod = ARLitModule(net, tokenizer=dm.tokenizer, distill_weight=0.25)
    mod.log = lambda *a, **k: None
    with torch.no_grad():
        logp = net(batch["ids"], types=batch["types"])[:, :-1].float().log_softmax(-1)
    m = batch["loss_mask"][:, 1:]
    ce_uni = -logp.mean(-1)[m].mean()
    assert torch.allclose(mod.training_step(uni, 0), 0.75 * want + 0.25 * ce_uni, atol=1e-4)

    with pytest.raises(ValueError, match="distill_weight is 0"):
        plain.training_step(batch, 0)
    with pytest.raises(ValueError, match="needs training batches with soft targets"):
        mod.training_step({k: v for k, v in batch.items() if k != "soft_targets"}, 0)
    for bad in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="module.distill_weight"):
            ARLitModule(net, distill_weight=bad)
    assert "soft_targets" not in next(iter(dm_soft.val_dataloader()))  # validation: the plain NLL


# ----------------------------------------------------------------------------- the data
def test_transpose_soft_rows_known_answer():
    first, v = 4, 10  # specials 0..3 (rest = 3), pitches 4..9
    rows = np.zeros((2, v), dtype=np.float32)
    rows[0, [3, 4, 9]] = [0.2, 0.3, 0.5]  # rest, lowest pitch, highest pitch
    rows[1, 6] = 1.0
    up = transpose_soft_rows(rows, 2, first)
    assert np.allclose(up[0], np.eye(v)[3] * 0.2 / 0.5 + np.eye(v)[6] * 0.3 / 0.5)  # the top pitch left the range
    assert np.allclose(up[1], np.eye(v)[8])
    down = transpose_soft_rows(rows, -1, first)
    assert np.allclose(down[0], np.eye(v)[3] * 0.2 / 0.7 + np.eye(v)[8] * 0.5 / 0.7)
    assert np.allclose(transpose_soft_rows(up, -2, first)[1], rows[1])
    assert transpose_soft_rows(rows, 0, first) is rows


def test_training_windows_carry_the_soft_targets_of_their_own_tokens_after_transposition(tmp_path, monkeypatch):
    import armodal.modalities.music.data as data_mod

    path = write_jsb(tmp_path / "jsb.npz", n=(8, 2, 2))
    dm = _dm(path)
    soft_file = _one_hot_targets(dm, tmp_path / "soft.npz")
    dm = _dm(path, soft=str(soft_file), max_transpose=5)
    shifts, real = [], data_mod._random_transpose

    def record(*a, **k):
        out = real(*a, **k)
        shifts.append(out[1])
        return out

    monkeypatch.setattr(data_mod, "_random_transpose", record)
    torch.manual_seed(0)
    for batch in dm.train_dataloader():
        soft, ids, mask = batch["soft_targets"], batch["ids"], batch["loss_mask"]
        has = soft.sum(-1) > 0
        assert torch.equal(has, mask)  # every scored voice-step token, and nothing else (BOS / EOS / PAD)
        assert torch.equal(soft.argmax(-1)[has], ids[has])  # aligned, and moved with the window's transposition
        assert torch.allclose(soft[has].max(-1).values, torch.ones(()))
    assert len(shifts) == 8 and sum(s != 0 for s in shifts) >= 4, shifts  # most windows were transposed


def test_soft_target_file_is_checked(tmp_path):
    path = write_jsb(tmp_path / "jsb.npz")
    dm = _dm(path)
    grids, v = dm.pieces("train"), dm.tokenizer.vocab_size
    good = _one_hot_targets(dm, tmp_path / "soft.npz")
    assert len(load_soft_targets(good, grids, v)) == len(grids)
    with pytest.raises(FileNotFoundError, match="soft_targets=.*nope.npz.*no such file"):
        load_soft_targets(tmp_path / "nope.npz", grids, v)
    with pytest.raises(ValueError, match="other training pieces"):  # computed for other data
        load_soft_targets(good, grids[1:], v)
    arrays = dict(np.load(good))
    arrays["piece_0"] = arrays["piece_0"][:, :, :-1]
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(ValueError, match=r"shape.npz: piece_0 has shape"):
        load_soft_targets(tmp_path / "shape.npz", grids, v)
    arrays = dict(np.load(good))
    arrays["piece_1"] = arrays["piece_1"] * 2
    np.savez(tmp_path / "sum.npz", **arrays)
    with pytest.raises(ValueError, match="not distributions"):
        load_soft_targets(tmp_path / "sum.npz", grids, v)
    with open(tmp_path / "pickled.npz", "wb") as f:
        np.savez(f, fingerprint=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickled.npz: not a soft-target .npz"):
        load_soft_targets(tmp_path / "pickled.npz", grids, v)
    (tmp_path / "junk.npz").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="junk.npz: not a soft-target .npz"):
        load_soft_targets(tmp_path / "junk.npz", grids, v)
    with pytest.raises(ValueError, match="not for the corpus chorales"):
        ChoraleDataModule(str(path), soft_targets=str(good))


# ----------------------------------------------------------------------------- the teacher file
def test_teacher_targets_cover_every_training_token_with_the_ensemble_distribution(tmp_path):
    path = write_jsb(tmp_path / "jsb.npz", n=(5, 2, 2))
    dm = _dm(path)
    tok = dm.tokenizer
    net = _net(tok)
    ds = dm.eval_dataset("train")
    with torch.no_grad():
        rows, stats = _script().soft_targets(net, tok, ds, dm.pieces("train"), SHIFTS)
        ref = transposition_ensemble_nll(net, tok, ds, SHIFTS)
    n_tokens = NUM_VOICES * sum(len(g) for g in dm.pieces("train"))
    assert stats["tokens"] == ref["tokens"] == n_tokens  # every training token exactly once
    assert stats["nll_train"] == pytest.approx(ref["nll"], rel=1e-5)  # the same mixture as the ensemble's score
    assert stats["nll_train_single"] == pytest.approx(ref["nll_single"], rel=1e-5)
    for g, a in zip(dm.pieces("train"), rows):
        assert a.shape == (len(g), NUM_VOICES, tok.vocab_size) and np.allclose(a.sum(-1), 1, atol=1e-4)
    # the stored rows are the teacher's prediction of those tokens: their NLL is the reported one
    nll = -np.mean(np.concatenate([np.log(np.take_along_axis(a, tok.pitch_to_id(g)[..., None], -1)).ravel()
                                   for g, a in zip(dm.pieces("train"), rows)]))
    assert nll == pytest.approx(stats["nll_train"], rel=1e-4)


def test_distillation_run_end_to_end_with_init_from(tmp_path):
    """Teacher run -> teacher file (the script) -> student run started from the teacher's weights with
    soft targets; refusals of init_from name the problem."""
    from armodal.train import train

    write_jsb(tmp_path / "jsb_chorales" / "Jsb16thSeparated.npz")
    small = ["experiment=music_jsb", f"paths.data_dir={tmp_path}", "modality.data.window_steps=16",
             "modality.data.stride_steps=8", "model.max_seq_len=66", "model.d_model=32", "model.n_layer=1",
             "model.n_head=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
             "logger=csv", "callbacks.samples.enabled=false", "callbacks.progress.refresh_rate=0", "~callbacks.early_stop"]
    teacher = tmp_path / "teacher"
    train(compose_cfg("train", [*small, f"run_dir={teacher}"], tmp_path))
    t_ckpt = teacher / "checkpoints" / "last.ckpt"
    soft = tmp_path / "soft.npz"
    stats = _script().main([str(t_ckpt), str(soft)])
    assert stats["tokens"] > 0 and soft.is_file()
    assert json.loads(soft.with_suffix(".json").read_text())["tokens"] == stats["tokens"]
    with pytest.raises(SystemExit, match="exists"):  # never replaced without --overwrite
        _script().main([str(t_ckpt), str(soft)])

    student = tmp_path / "student"
    cfg = compose_cfg("train", [*small, f"run_dir={student}", f"init_from={t_ckpt}",
                                f"modality.data.soft_targets={soft}", "module.distill_weight=0.5"], tmp_path)
    start = {}
    import armodal.train as train_mod

    real = train_mod.init_weights

    def spy(module, path, modality):
        real(module, path, modality)
        start.update({k: v.clone() for k, v in module.net.state_dict().items()})

    train_mod.init_weights = spy
    try:
        metrics = train(cfg)
    finally:
        train_mod.init_weights = real
    t_ema = armodal.load(t_ckpt).net.state_dict()
    assert start and all(torch.equal(start[k], t_ema[k]) for k in t_ema)  # started from the teacher's EMA weights
    assert metrics["global_step"] == 2 and math.isfinite(metrics["final"]["val/nll"])
    assert math.isfinite(metrics["final"]["train/nll"])

    with pytest.raises(FileNotFoundError, match="init_from=.*missing.ckpt.*no such checkpoint"):
        train(compose_cfg("train", [*small, f"run_dir={tmp_path / 'x1'}", f"init_from={tmp_path / 'missing.ckpt'}"],
                          tmp_path))
    assert not (tmp_path / "x1").exists()  # refused before any side effect
    with pytest.raises(CheckpointError, match="init_from=.*do not fit this run's model"):
        train(compose_cfg("train", [*small, f"run_dir={tmp_path / 'x2'}", f"init_from={t_ckpt}", "model.d_model=64"],
                          tmp_path))
