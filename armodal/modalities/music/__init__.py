"""Music modality: MIDI event tokenizers (miditok + symusic) and the JSB grid tokenizer,
MIDI-folder and JSB-chorales datamodules, a grammar-constrained sampler writing MIDI / piano roll / WAV,
and sample metrics.

Modules: ``tokenizer``, ``data``, ``sampler``, ``evaluate`` (the skeleton every modality shares) and the
domain extras ``grid`` (JSB grid <-> MIDI), ``chorales`` (music21's corpus chorales as grids with
fermatas, keys and meters), ``analysis`` (chorale metrics), ``midi_io``, ``render``, ``bach``, ``jsb_ensemble``.
"""

from armodal.modalities.music.bach import convert_bach_chorales
from armodal.modalities.music.chorales import Chorale, convert_corpus_chorales, load_chorales
from armodal.modalities.music.data import (
    ChoraleDataModule,
    JSBDataModule,
    MidiDataModule,
    MidiSkipWarning,
    find_midi_files,
    load_jsb,
    split_of,
    time_stretch,
)
from armodal.modalities.music.evaluate import MusicEvaluator, compare_sets, piece_stats
from armodal.modalities.music.grid import grid_to_score, score_to_grid, transpose_grid
from armodal.modalities.music.midi_io import BadMidiError, read_midi
from armodal.modalities.music.sampler import MusicSampler
from armodal.modalities.music.tokenizer import ChoraleTokenizer, JSBTokenizer, MidiTokenizer, merge_tracks

__all__ = [
    "BadMidiError",
    "Chorale",
    "ChoraleDataModule",
    "ChoraleTokenizer",
    "JSBDataModule",
    "JSBTokenizer",
    "MidiDataModule",
    "MidiSkipWarning",
    "MidiTokenizer",
    "MusicEvaluator",
    "MusicSampler",
    "compare_sets",
    "convert_bach_chorales",
    "convert_corpus_chorales",
    "find_midi_files",
    "grid_to_score",
    "load_chorales",
    "load_jsb",
    "merge_tracks",
    "piece_stats",
    "read_midi",
    "score_to_grid",
    "split_of",
    "time_stretch",
    "transpose_grid",
]
