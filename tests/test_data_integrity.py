"""Data mix-ups are errors, caches never go stale, splits are disjoint, random draws are seeded
(issue 12 sections 2, 4 and 6).  Every test writes its own synthetic files."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from armodal.utils.safety import ConfigValueError, UnsafeTargetError
from tests.test_music import make_score, tiny_model, write_folder, write_jsb
from tests.test_spatial import write_her2st

TOK = {"kind": "midilike", "beat_res": {"0_4": 4}}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _readonly_dir(tmp_path: Path) -> Path:
    """A cache folder nothing can be written into (as root, permissions are ignored: a path below a file)."""
    d = tmp_path / "ro_cache"
    d.mkdir()
    os.chmod(d, 0o555)
    if os.access(d, os.W_OK):  # root
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        return blocker / "cache"
    return d


# ----------------------------------------------------------------------------- 2. gene panel
def test_gene_panel_file_cannot_run_code(tmp_path):
    from armodal.modalities.spatial import SpatialDataError, load_panel

    marker = tmp_path / "MARKER"
    evil = tmp_path / "panel.npy"
    np.save(evil, np.array(["G1", _Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(SpatialDataError, match=rf"{evil}: the panel must be a plain array of gene symbols"):
        load_panel(evil)
    assert not marker.exists()
    ok = tmp_path / "ok.npy"
    np.save(ok, np.array(["G1", "G2"]))
    assert load_panel(ok) == ["G1", "G2"]


def test_real_gene_panel_needs_no_pickle():
    from tests.test_spatial import _her2st

    path = _her2st() / "her_hvg_cut_1000.npy"
    if not path.is_file():
        pytest.skip(f"{path}: not available")
    from armodal.modalities.spatial import load_panel

    assert len(load_panel(path)) == 785 and np.load(path, allow_pickle=False).dtype.kind == "U"


def test_jsb_file_with_a_pickled_payload_is_refused(tmp_path):
    from armodal.modalities.music import load_jsb

    marker = tmp_path / "MARKER"
    path = write_jsb(tmp_path / "ok.npz")
    assert {k: len(v) for k, v in load_jsb(path).items()} == {"train": 6, "valid": 3, "test": 3}
    bad = tmp_path / "evil.npz"
    np.savez(bad, train=np.array([_Payload(marker)], dtype=object), valid=np.zeros((0,)), test=np.zeros((0,)))
    with pytest.raises(UnsafeTargetError, match=r"evil.npz:train.npy: refusing to unpickle posix.system"):
        load_jsb(bad)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 4. music root / conversion
def test_mistyped_music_root_is_an_error_not_a_bach_conversion(tmp_path):
    from armodal.modalities.music import MidiDataModule

    typo = tmp_path / "my_midis_typo"
    dm = MidiDataModule(str(typo), tokenizer=TOK, cache_dir=str(tmp_path / "cache"), convert_music21_bach=True)
    with pytest.raises(FileNotFoundError, match=rf"{typo}: MIDI folder not found .*nothing is converted into it"):
        dm.prepare_data()
    assert not typo.exists() and not (tmp_path / "cache").exists()


def test_partial_bach_conversion_is_redone_never_used(tmp_path, monkeypatch):
    """The conversion (music21 -> MIDI, minutes) is replaced by a writer of synthetic pieces; what is
    tested is the data module's rule: a folder is used only once its conversion completed."""
    import armodal.modalities.music.bach as bach
    from armodal.modalities.music import MidiDataModule

    calls = []

    def fake_convert(out_dir, limit=None, verbose=True, fail_after=None):
        calls.append(out_dir)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt  # killed in the middle of the first conversion
            make_score(i).dump_midi(str(Path(out_dir) / f"bwv{i}.mid"))
        return 6, []

    monkeypatch.setattr(bach, "convert_bach_chorales", fake_convert)
    kw = dict(tokenizer=TOK, cache_dir=str(tmp_path / "cache"), convert_music21_bach=True, max_seq_len=64)
    with pytest.raises(KeyboardInterrupt):
        MidiDataModule(None, **kw).prepare_data()
    folder = tmp_path / "cache" / "music" / "bach_chorales_midi"
    assert len(list(folder.glob("*.mid"))) == 2 and not (folder / ".complete").exists()
    dm = MidiDataModule(None, **kw)
    dm.setup("fit")  # the partial folder is converted again, then used
    assert len(calls) == 2 and dm.root == folder and (folder / ".complete").is_file()
    assert sum(len(v) for v in dm.names.values()) == 6
    MidiDataModule(None, **kw).setup("fit")
    assert len(calls) == 2  # complete: not converted again


# ----------------------------------------------------------------------------- 4. caches keyed on content
def test_music_cache_is_keyed_on_content_and_data_root(tmp_path):
    from armodal.modalities.music import MidiDataModule

    root = write_folder(tmp_path / "midi", 6)
    kw = dict(tokenizer=TOK, cache_dir=str(tmp_path / "cache"), max_seq_len=64, val_fraction=0.2, test_fraction=0.2)
    MidiDataModule(str(root), **kw).setup()
    caches = lambda: sorted((tmp_path / "cache" / "music").glob("*.pt"))  # noqa: E731
    assert len(caches()) == 1
    # same name, same size, same mtime, other notes (every pitch a semitone up)
    from symusic import Score

    victim = sorted(root.rglob("*.mid"))[0]
    st = victim.stat()
    score = Score(str(victim))
    for t in score.tracks:
        for n in t.notes:
            n.pitch += 1
    other = tmp_path / "other.mid"
    score.dump_midi(str(other))
    assert other.stat().st_size == st.st_size and other.read_bytes() != victim.read_bytes()
    shutil.copyfile(other, victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    MidiDataModule(str(root), **kw).setup()
    assert len(caches()) == 2, "a replaced file reused the old token cache"
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "midi", copy_function=shutil.copy2)
    MidiDataModule(str(copy), **kw).setup()
    assert len(caches()) == 3, "another data root reused the cache"


def test_spatial_feature_cache_notices_a_replaced_he_image(tmp_path):
    from PIL import Image

    from armodal.modalities.spatial import SpatialDataModule

    root = tmp_path / "her2st"
    for i, s in enumerate(["A", "B"]):
        write_her2st(root, s, seed=i)
    kw = dict(root=str(root), sections=["A", "B"], test_section="B", panel=None, n_hvg=20, neighbours=2,
              tokenizer={"n_levels": 2, "codebook_size": 4}, cache_dir=str(tmp_path / "cache"),
              features={"weights": "random", "patch_size": 100, "patch_px": 32, "n_views": 1})
    dm = SpatialDataModule(**kw)
    dm.setup()
    before = {s: dm.feats[s].clone() for s in ("A", "B")}
    img = root / "ST-imgs" / "P" / "A" / "HE_A.jpg"
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img, quality=95)  # another slide, same file name
    dm2 = SpatialDataModule(**kw)
    dm2.setup()
    assert not torch.allclose(dm2.feats["A"], before["A"]), "the replaced H&E image got the old features"
    torch.testing.assert_close(dm2.feats["B"], before["B"])  # B untouched: from the cache
    assert len(list((tmp_path / "cache" / "spatial").rglob("A-*.pt"))) == 2


def test_read_only_cache_warns_then_runs_without_it(tmp_path):
    from armodal.modalities.music import MidiDataModule

    root = write_folder(tmp_path / "midi", 6)
    ro = _readonly_dir(tmp_path)
    dm = MidiDataModule(str(root), tokenizer=TOK, cache_dir=str(ro), max_seq_len=64, val_fraction=0.2,
                        test_fraction=0.2)
    with pytest.warns(UserWarning, match="cache folder is not writable.*running without the cache"):
        dm.setup("fit")
    assert sum(len(v) for v in dm.names.values()) == 6 and next(iter(dm.train_dataloader()))["ids"].numel()


# ----------------------------------------------------------------------------- 4. seeded random draws
@pytest.mark.parametrize("which", ["midi", "jsb"])
def test_music_training_windows_are_seeded_from_the_run_seed(which, tmp_path):
    import pytorch_lightning as pl

    from armodal.modalities.music import JSBDataModule, MidiDataModule

    if which == "midi":
        root = write_folder(tmp_path / "midi", 8)
        make = lambda: MidiDataModule(str(root), tokenizer=TOK, max_seq_len=32, batch_size=4,  # noqa: E731
                                      time_stretch=[1.0, 2.0])
    else:
        path = write_jsb(tmp_path / "jsb.npz", n=(8, 2, 2))
        make = lambda: JSBDataModule(str(path), batch_size=4, window_steps=8, stride_steps=4)  # noqa: E731

    def draw(seed: int) -> list[torch.Tensor]:
        pl.seed_everything(seed, workers=True)
        dm = make()
        dm.setup("fit")
        return [b["ids"] for _ in range(2) for b in dm.train_dataloader()]

    a, b, c = draw(7), draw(7), draw(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), "two runs with the same seed drew different windows"
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c))


# ----------------------------------------------------------------------------- 4. disjoint splits
def test_tiny_midi_folder_test_split_shares_no_piece_with_train(tmp_path):
    from armodal.modalities.music import MidiDataModule

    for n in (3, 4, 5):
        root = write_folder(tmp_path / f"midi{n}", n)
        dm = MidiDataModule(str(root), tokenizer=TOK, max_seq_len=64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dm.setup("fit")
        names = {k: set(v) for k, v in dm.names.items()}
        assert all(names.values()), names
        assert not (names["train"] & names["test"]) and not (names["train"] & names["val"]) and not (
            names["val"] & names["test"]), names
        assert len(names["train"] | names["val"] | names["test"]) == n
    root = write_folder(tmp_path / "midi2", 2)
    with pytest.raises(ValueError, match="2 usable MIDI piece.*at least one distinct piece each"):
        MidiDataModule(str(root), tokenizer=TOK, max_seq_len=64).setup("fit")


def test_train_val_test_are_disjoint(tmp_path):
    """Image folders and spatial sections: no item of one split appears in another (music: the test
    above; the tokens toy corpus and its test split belong to issue 16)."""
    from armodal.modalities.image import ImageDataModule
    from armodal.modalities.spatial import SpatialDataModule
    from tests.test_image import _write_folder

    _write_folder(tmp_path / "img", per_class=5, size=16, mode="L")
    im = ImageDataModule(source="folder", root=str(tmp_path / "img"), channels=1, image_size=16, val_size=2,
                         test_fraction=0.2, batch_size=4)
    im.prepare_data()
    im.setup("fit")
    seen = {k: {v.numpy().tobytes() for v in s.images} for k, s in im.splits.items()}
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])

    root = tmp_path / "her2st"
    for i, s in enumerate(["A", "B", "C"]):
        write_her2st(root, s, seed=i)
    sp = SpatialDataModule(root=str(root), sections=["A", "B", "C"], test_section="C", panel=None, n_hvg=20,
                           neighbours=2, tokenizer={"n_levels": 2, "codebook_size": 4}, val_fraction=0.3,
                           features={"weights": "random", "patch_size": 100, "patch_px": 32, "n_views": 1})
    sp.setup()
    assert "C" not in sp.train_sections and not {s for s, _ in sp.train_spots + sp.val_spots} & {"C"}
    assert not set(sp.train_spots) & set(sp.val_spots)


# ----------------------------------------------------------------------------- 6. enums, limits, metrics, prompts
def test_enum_config_values_are_validated(tmp_path):
    from armodal.modalities.spatial import SpatialDataModule, apply_panel
    from armodal.train import train
    from tests.conftest import compose_cfg

    with pytest.raises(ConfigValueError, match=r"on_missing_genes='ignore' is not one of 'error', 'warn'"):
        SpatialDataModule(root=str(tmp_path), sections=["A"], on_missing_genes="ignore")
    with pytest.raises(ValueError, match=r"on_missing_genes='ignore' is not one of 'error', 'warn'"):
        apply_panel({}, ["G1"], on_missing="ignore")
    cfg = compose_cfg("train", ["experiment=spatial_her2st", "modality.data.on_missing_genes=ignore",
                                f"run_dir={tmp_path / 'run'}"], tmp_path)
    with pytest.raises(ConfigValueError, match=r"modality.data.on_missing_genes='ignore' is not valid .*one of 'error', 'warn'"):
        train(cfg)  # refused from the config, before any data is read or anything written
    assert not (tmp_path / "run").exists()


def test_midi_with_exactly_the_note_limit_is_skipped(tmp_path):
    from armodal.modalities.music import BadMidiError, read_midi

    path = tmp_path / "p.mid"
    make_score(0).dump_midi(str(path))
    n = sum(len(t.notes) for t in read_midi(path).tracks)
    with pytest.raises(BadMidiError, match=rf"too many notes \({n} >= max_notes={n}\)"):
        read_midi(path, max_notes=n)
    assert read_midi(path, max_notes=n + 1)


def test_a_piece_dominating_the_training_windows_is_warned_about(tmp_path):
    from armodal.modalities.music import MidiDataModule

    root = write_folder(tmp_path / "midi", 6)
    make_score(50, n_bars=200).dump_midi(str(root / "a" / "0huge.mid"))  # sorted first: stays in train
    dm = MidiDataModule(str(root), tokenizer=TOK, max_seq_len=32, val_fraction=0.0, test_fraction=0.0)
    with pytest.warns(UserWarning, match=r"0huge.mid makes up \d+\.\d% of the training windows"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*split was empty.*")
            dm.setup("fit")


def test_metric_on_tiny_data_returns_a_named_reason():
    from armodal.modalities.image.evaluate import MetricUnavailable, _fd, frechet_distance

    rng = np.random.default_rng(0)
    with pytest.raises(MetricUnavailable, match=r"at least 2 images per set \(got 1 and 5\)"):
        frechet_distance(rng.normal(size=(1, 16)), rng.normal(size=(5, 16)))
    reasons: dict = {}
    assert _fd(rng.normal(size=(1, 16)), rng.normal(size=(5, 16)), "fd.recon_vs_test", reasons) is None
    assert "at least 2 images" in reasons["fd.recon_vs_test"]
    assert _fd(rng.normal(size=(8, 4)), rng.normal(size=(9, 4)), "fd.x", reasons) > 0 and "fd.x" not in reasons


def test_vq_eval_on_a_tiny_folder_reports_why_fd_is_missing(tmp_path):
    from armodal.modalities.image import ImageDataModule, ImageEvaluator
    from armodal.modalities.image.vq import VQConfig, VQModel
    from tests.test_image import _write_folder

    _write_folder(tmp_path / "img", per_class=2, size=28, mode="L")  # test split: one image
    dm = ImageDataModule(source="folder", root=str(tmp_path / "img"), channels=1, val_size=1, test_fraction=0.1,
                         batch_size=2)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.splits["test"]) == 1
    torch.manual_seed(0)
    vq = VQModel(VQConfig(in_channels=1, channels=[8, 16, 16], codebook_size=16, code_dim=4)).eval()
    m = ImageEvaluator(cache_dir=str(tmp_path / "cache"), clf_epochs=1)(type("Stage", (), {"vq": vq})(), dm,
                                                                      tmp_path / "out")
    assert m["fd"]["recon_vs_test"] is None and "at least 2 images" in m["unavailable"]["fd.recon_vs_test"]
    assert np.isfinite(m["vq"]["test_psnr_db"])
    json.dumps(m, default=str)


def test_long_prompt_is_truncated_with_a_warning(tmp_path):
    from armodal.modalities.music import MidiTokenizer, MusicSampler

    tok = MidiTokenizer("midilike", beat_res={"0_4": 4}, num_velocities=4)
    model = tiny_model(tok, 128)
    prompt = tmp_path / "long.mid"
    make_score(3, n_bars=16).dump_midi(str(prompt))
    assert len(tok.prompt_ids(__import__("symusic").Score(str(prompt)), str(prompt))) > 128
    with pytest.warns(UserWarning, match=r"long.mid: the prompt has \d+ tokens, too many for max_seq_len=128.*"
                                         r"truncated to its first \d+ tokens"):
        res = MusicSampler({"max_new_tokens": 40, "seed": 0}, audio=False)(model, 1, tmp_path / "out", prompt=str(prompt))
    assert res["num_samples"] == 1 and 2 <= res["prompt_tokens"] <= 128 - 40 and res["grammar_errors"] == [0]
