"""Contract kit for the music modality (MIDI event tokenizers and the JSB grid)."""

from __future__ import annotations

import numpy as np

from armodal.modalities.music import (
    Chorale,
    ChoraleDataModule,
    ChoraleTokenizer,
    JSBDataModule,
    JSBTokenizer,
    MidiDataModule,
    MidiTokenizer,
)
from tests.test_music import make_score, random_grid, write_folder, write_jsb
from tests.test_music_chorales import random_chorale, write_chorales

MODALITY = "music"
EXPERIMENTS = ("music_bach", "music_chorales", "music_jsb")
_SMALL = {"beat_res": {"0_4": 4, "4_12": 2}, "num_velocities": 8}


def tokenizers(tmp):
    grids = [random_grid(np.random.default_rng(s), 12) for s in range(2)]
    return {
        "music.midilike": (MidiTokenizer("midilike", **_SMALL), [make_score(0), make_score(1)]),
        "music.remi": (MidiTokenizer("remi", **_SMALL), [make_score(2)]),
        "music.jsb": (JSBTokenizer(beat_types=True, hold_types=4), grids),
        "music.chorales": (ChoraleTokenizer(hold_types=4),
                           [random_chorale(np.random.default_rng(s), 12 + 4 * s) for s in range(2)]),
    }


def representable(tok, item):
    return tok.representable(item) if isinstance(tok, MidiTokenizer) else item


def same(a, b):
    if isinstance(a, Chorale):
        return (np.array_equal(a.grid, b.grid, equal_nan=True) and np.array_equal(a.fermata, b.fermata)
                and (a.tonic, a.mode, a.bar_len, a.first_pos) == (b.tonic, b.mode, b.bar_len, b.first_pos))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    from tests.test_music import note_set

    return note_set(a) == note_set(b)


def datamodules(tmp):
    return {
        "music.midi": MidiDataModule(str(write_folder(tmp / "midi", 8)), convert_music21_bach=False,
                                     cache_dir=str(tmp / "cache"), tokenizer={"kind": "midilike", **_SMALL},
                                     max_seq_len=64, batch_size=4, val_fraction=0.25, test_fraction=0.25),
        "music.jsb": JSBDataModule(str(write_jsb(tmp / "jsb" / "Jsb16thSeparated.npz")), batch_size=4,
                                   window_steps=16, stride_steps=8, hold_types=4),
        "music.chorales": ChoraleDataModule(str(write_chorales(tmp / "chorales.npz")), batch_size=4, window_steps=16,
                                            stride_steps=8, hold_types=4),
    }


def experiments(tmp):
    midi = write_folder(tmp / "midi", 8)
    write_jsb(tmp / "jsb" / "jsb_chorales" / "Jsb16thSeparated.npz")
    chorales = write_chorales(tmp / "chorales.npz")
    short = ["model.max_seq_len=64", "model.d_model=32", "model.n_layer=1", "model.n_head=2",
             "modality.evaluator.num_samples=2", "++modality.sampler.generation.max_new_tokens=24"]
    return {
        "music_bach": [f"modality.data.root={midi}", "modality.data.convert_music21_bach=false",
                       "modality.data.val_fraction=0.25", "modality.data.test_fraction=0.25", *short],
        "music_chorales": [f"modality.data.path={chorales}", "modality.data.window_steps=12",
                           "modality.data.stride_steps=8", *short],
        "music_jsb": [f"paths.data_dir={tmp / 'jsb'}", "modality.data.window_steps=12", "modality.data.stride_steps=8",
                      *short],
    }
