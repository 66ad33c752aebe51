"""The package layout: old saved files keep loading, the tokens evaluator, import arrows (CLI modules are leaves)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from armodal.modalities.base import TOKENIZER_FILE, load_tokenizer
from armodal.utils.config import ROOT_DIR


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "legacy_v1"  # written by commit 4a2553f (see make.py)


def test_checkpoint_from_before_the_registry_loads():
    """A run saved before the layout change (tokenizer.json names armodal.modalities.music.jsb.JSBTokenizer)."""
    import armodal
    from armodal.modalities.music import JSBTokenizer
    from armodal.training.checkpoint import read_checkpoint

    ckpt = FIXTURES / "jsb" / "checkpoints" / "last.ckpt"
    assert json.loads((FIXTURES / "jsb" / "tokenizer" / TOKENIZER_FILE).read_text())["_target_"].endswith("jsb.JSBTokenizer")
    model = armodal.load(ckpt, expect_modality="music")
    assert isinstance(model.tokenizer, JSBTokenizer) and model.tokenizer.hold_types == 8
    state = read_checkpoint(ckpt)["state_dict"]
    assert torch.equal(model.net.tok_emb.weight, state["ema.net.tok_emb.weight"])  # the EMA weights by default
    out = model.generate(num_samples=2, max_new_tokens=9, seed=0)
    assert out.ids.shape == (2, 10) and model.tokenizer.grammar_errors(out.ids[0]) == 0


def test_spatial_tokenizer_from_before_the_registry_loads():
    from armodal.modalities.spatial import RVQExpressionTokenizer

    tok = load_tokenizer(FIXTURES / "spatial_rvq")
    assert isinstance(tok, RVQExpressionTokenizer)
    x = np.load(FIXTURES / "spatial_rvq" / "expr.npy")
    np.testing.assert_array_equal(tok.encode(x).numpy(), np.load(FIXTURES / "spatial_rvq" / "ids.npy"))


def _rewrite(directory, **changes) -> None:
    path = directory / TOKENIZER_FILE
    payload = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            payload.pop(k, None)
        else:
            payload[k] = v
    path.write_text(json.dumps(payload))


def test_tokenizer_file_names_the_short_name_and_format(tmp_path):
    from armodal.modalities.base import TOKENIZER_FORMAT
    from armodal.modalities.music import MidiTokenizer

    MidiTokenizer("remi", beat_res={"0_4": 4}, num_velocities=4).save(tmp_path)
    payload = json.loads((tmp_path / TOKENIZER_FILE).read_text())
    assert payload["tokenizer"] == "music.remi" and payload["format"] == TOKENIZER_FORMAT and "_target_" not in payload
    assert load_tokenizer(tmp_path).kind == "remi"


def test_format1_file_of_a_class_that_never_moved_loads(tmp_path):
    from armodal.modalities.tokens import TokensTokenizer

    TokensTokenizer(5).save(tmp_path)
    _rewrite(tmp_path, tokenizer=None, format=None, _target_="armodal.modalities.tokens.tokenizer.TokensTokenizer")
    assert load_tokenizer(tmp_path).n_symbols == 5


@pytest.mark.parametrize("changes,message", [
    ({"tokenizer": "music.nope"}, r"no tokenizer registered as 'music.nope'.*music.jsb"),
    ({"format": 3}, "format 3 was written by a newer armodal"),
    ({"tokenizer": None, "format": None, "_target_": "os.system"}, "'os.system', which is not a registered"),
    ({"tokenizer": None, "format": None}, "not an armodal tokenizer file"),
    ({"state": None}, "no 'state' object"),
])
def test_bad_tokenizer_files_name_the_file(tmp_path, changes, message):
    from armodal.modalities.base import TokenizerFileError
    from armodal.modalities.tokens import TokensTokenizer

    TokensTokenizer(5).save(tmp_path)
    _rewrite(tmp_path, **changes)
    with pytest.raises(TokenizerFileError, match=message) as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / TOKENIZER_FILE) in str(e.value)


# ----------------------------------------------------------------------------- tokens evaluator
def test_tokens_sequence_stats_known_answer():
    from armodal.modalities.tokens.evaluate import sequence_stats

    s = sequence_stats(samples=[[0, 1, 2], [2, 3]], reference=[[0, 1, 2, 3]], train=[[0, 1, 2]], n_symbols=4)
    # unigrams: samples (1, 1, 2, 1) / 5 vs reference (1, 1, 1, 1) / 4 -> TV = (3 * 0.05 + 0.15) / 2
    assert s["unigram_tv"] == pytest.approx(0.15)
    assert s["bigram_seen"] == pytest.approx(2 / 3)  # (0,1) (1,2) seen in training, (2,3) not
    assert s["distinct_2"] == pytest.approx(1.0)
    assert s["mean_length"] == pytest.approx(2.5) and s["reference_mean_length"] == pytest.approx(4.0)


def test_tokens_evaluator_on_a_model(tmp_path):
    from armodal.ar_model import ARModel
    from armodal.models import build_transformer
    from armodal.modalities.tokens import TokensDataModule, TokensEvaluator, write_toy_corpus
    from armodal.modalities.tokens.evaluate import sequence_stats

    write_toy_corpus(tmp_path / "toy", vocab_size=8, length=12, n_train=40)
    dm = TokensDataModule(str(tmp_path / "toy"), seq_len=16, batch_size=4)
    dm.setup("fit")
    torch.manual_seed(0)
    net = build_transformer(vocab_size=dm.tokenizer.vocab_size, d_model=16, n_layer=1, n_head=2, max_seq_len=32)
    model = ARModel(net, dm.tokenizer).eval()
    m = TokensEvaluator(num_samples=6, generation={"max_new_tokens": 14})(model, dm, tmp_path / "out")
    assert all(isinstance(v, float) for v in m.values()), m
    samples = json.loads((tmp_path / "out" / "tokens_samples.json").read_text())
    assert len(samples) == 6 and m["tokens/num_samples"] == 6.0
    again = sequence_stats(samples, dm.sequences("val"), dm.sequences("train"), dm.tokenizer.n_symbols)
    assert m["tokens/bigram_seen"] == pytest.approx(again["bigram_seen"])
    assert 0.0 <= m["tokens/unigram_tv"] <= 1.0 and 0.0 <= m["tokens/eos_rate"] <= 1.0


# ----------------------------------------------------------------------------- import arrows
def test_import_armodal_loads_no_cli_module():
    code = ("import sys, armodal; armodal.ARModel; armodal.load; "
            "bad = [m for m in ('armodal.train', 'armodal.generate', 'armodal.eval', 'armodal.export') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT_DIR, check=True)
    assert out.stdout.strip() == "", f"importing armodal imported CLI modules: {out.stdout}"


# ----------------------------------------------------------------------------- import arrows
# docs/ARCHITECTURE.md: a module may import its own layer and the layers to its right, never to its left.
LAYERS = [  # (module prefix, layer); the longest matching prefix wins
    ("armodal.train", 8), ("armodal.generate", 8), ("armodal.eval", 8),
    ("armodal.api", 7),
    ("armodal.modalities", 6),
    ("armodal.training", 5),
    ("armodal.ar_model", 4),
    ("armodal.modalities.base", 3),
    ("armodal.generation", 2),
    ("armodal.models", 1),
    ("armodal.utils", 0),
]
CLI = ("armodal.train", "armodal.generate", "armodal.eval")


def _is_cli(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in CLI)


def _layer(module: str) -> tuple[str, int] | None:
    best = None
    for prefix, layer in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """armodal modules imported anywhere in a file (functions included), except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for child in node.body for n in ast.walk(child)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "armodal"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "armodal":
                out += [(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base, node.lineno) for a in node.names]
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT_DIR / rel).with_suffix(".py").is_file() or (ROOT_DIR / rel / "__init__.py").is_file()


def arrow_violations() -> list[str]:
    bad = []
    for path in sorted((ROOT_DIR / "armodal").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT_DIR).with_suffix("").parts).removesuffix(".__init__")
        if module == "armodal":
            continue  # the package root only re-exports lazily (tested: import armodal imports no CLI module)
        src = _layer(module)
        for target, line in _imports(path, module):
            dst = _layer(target)
            where = f"{path.relative_to(ROOT_DIR)}:{line} imports {target}"
            if dst is None or src is None:
                continue
            if _is_cli(target) and not _is_cli(module):
                bad.append(f"{where}: CLI modules are leaves nothing imports")
            elif _is_cli(module) and _is_cli(target) and target.split(".")[1] != module.split(".")[1]:
                bad.append(f"{where}: one CLI module imports another")
            elif dst[1] > src[1]:
                bad.append(f"{where}: {src[0]} (layer {src[1]}) may not import {dst[0]} (layer {dst[1]})")
            elif src[0] == dst[0] == "armodal.modalities" and module.split(".")[2] != target.split(".")[2]:
                bad.append(f"{where}: a modality imports another modality")
    return bad


def test_import_arrows_point_one_way():
    bad = arrow_violations()
    assert not bad, "imports against the arrows of docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def test_arrow_check_catches_a_wrong_arrow(tmp_path, monkeypatch):
    """The checker itself: a training module importing the CLI and a modality importing another are caught."""
    fake = tmp_path / "armodal"
    for rel, text in {"training/x.py": "def f():\n    from armodal.eval import evaluate\n",
                      "modalities/music/y.py": "from armodal.modalities.image import data\n",
                      "modalities/image/data.py": "", "eval.py": "", "modalities/base.py": "from armodal.api import load\n",
                      "api.py": ""}.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT_DIR", tmp_path)
    bad = arrow_violations()
    assert len(bad) == 3 and any("CLI modules are leaves" in b for b in bad)
    assert any("another modality" in b for b in bad) and any("modalities.base (layer 3)" in b for b in bad)


# ----------------------------------------------------------------------------- sample logging
def test_sample_callback_logs_every_declared_kind(tmp_path):
    """Images, audio and text go to TensorBoard; every declared file (any kind) to samples.csv."""
    import csv
    import wave

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from armodal.training.callbacks import declared_outputs, log_to_tensorboard, write_samples_csv

    png, wav, txt, mid = tmp_path / "a.png", tmp_path / "a.wav", tmp_path / "a.txt", tmp_path / "a.mid"
    Image.fromarray(np.full((8, 12, 3), 200, np.uint8)).save(png)
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((np.sin(np.arange(1600) / 5.0)[:, None].repeat(2, 1) * 20000).astype(np.int16).tobytes())
    txt.write_text("a b c\n")
    mid.write_bytes(b"MThd")
    summary = {"images": [str(png)], "audio": [str(wav)], "text": [str(txt)], "files": [str(mid)], "num_samples": 1,
               "midi": [str(mid)]}
    outputs = declared_outputs(summary)
    assert [k for k, _ in outputs] == ["images", "audio", "text", "files"]

    writer = SummaryWriter(str(tmp_path / "tb"))
    with pytest.warns(UserWarning, match="could not log images sample .*missing.png"):  # skipped, named
        log_to_tensorboard(writer, [("images", str(tmp_path / "missing.png"))] + outputs, step=7)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "audio": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert tags["images"] == ["samples/images/0"] and tags["audio"] == ["samples/audio/0"]
    assert any(t.startswith("samples/text/0") for t in tags["tensors"])
    assert events.Images("samples/images/0")[0].step == 7 and events.Audio("samples/audio/0")[0].sample_rate == 8000

    write_samples_csv(tmp_path / "samples.csv", 7, outputs)
    write_samples_csv(tmp_path / "samples.csv", 9, outputs[:1])
    rows = list(csv.reader((tmp_path / "samples.csv").open()))
    assert rows[0] == ["step", "kind", "path"] and len(rows) == 6 and rows[-1] == ["9", "images", str(png)]


def test_scripts_paths_come_from_conf_paths(monkeypatch, tmp_path):
    from armodal.utils.config import load_paths

    for var in ("ARMODAL_SHARED_DATA", "ARMODAL_CACHE", "ARMODAL_RUNS"):
        monkeypatch.delenv(var, raising=False)
    p = load_paths()
    assert p["runs_dir"] == ROOT_DIR / "runs" and p["cache_dir"] == ROOT_DIR / "data_cache"
    assert p["data_dir"] == ROOT_DIR / ".." / "shared" / "data"
    monkeypatch.setenv("ARMODAL_RUNS", str(tmp_path / "r"))
    monkeypatch.setenv("ARMODAL_SHARED_DATA", str(tmp_path / "d"))
    p = load_paths(cache_dir=tmp_path / "c")
    assert (p["runs_dir"], p["data_dir"], p["cache_dir"]) == (tmp_path / "r", tmp_path / "d", tmp_path / "c")


def test_base_install_without_modality_extras(tmp_path):
    """With the music / image / spatial dependencies missing, the core and the tokens modality work, and
    asking for another modality's part names the pip extra to install."""
    code = f"""
import sys
for m in ("miditok", "symusic", "music21", "scanpy", "anndata", "timm", "safetensors"):  # torchvision: lightning probes it
    sys.modules[m] = None  # as if not installed (find_spec still sees them: keep to what lightning does not probe)
from armodal.utils import registry
from armodal.modalities.base import load_tokenizer
from armodal.modalities.tokens import TokensTokenizer
TokensTokenizer(7).save({str(tmp_path)!r})
assert load_tokenizer({str(tmp_path)!r}).n_symbols == 7
failed = registry.import_builtin_modalities()
assert {{"music", "spatial"}} <= set(failed), failed  # image imports its extras lazily
try:
    registry.get("tokenizer", "music.remi")
except registry.RegistryError as e:
    print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT_DIR, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'armodal[music]'" in out.stdout and "no tokenizer registered as 'music.remi'" in out.stdout
