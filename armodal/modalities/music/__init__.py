"""Music modality: MIDI event tokenizers (miditok + symusic), MIDI-folder and JSB-chorales
datamodules, a grammar-constrained sampler writing MIDI / piano roll / WAV, and sample metrics."""

from armodal.modalities.music.bach import convert_bach_chorales
from armodal.modalities.music.data import MidiDataModule, MidiSkipWarning, find_midi_files, split_of, time_stretch
from armodal.modalities.music.jsb import (
    JSBDataModule,
    JSBTokenizer,
    grid_to_score,
    load_jsb,
    score_to_grid,
    transpose_grid,
)
from armodal.modalities.music.metrics import MusicEvaluator, compare_sets, piece_stats
from armodal.modalities.music.midi_io import BadMidiError, read_midi
from armodal.modalities.music.sampler import MusicSampler
from armodal.modalities.music.tokenizer import MidiTokenizer, merge_tracks

__all__ = [
    "BadMidiError",
    "JSBDataModule",
    "JSBTokenizer",
    "MidiDataModule",
    "MidiSkipWarning",
    "MidiTokenizer",
    "MusicEvaluator",
    "MusicSampler",
    "compare_sets",
    "convert_bach_chorales",
    "find_midi_files",
    "grid_to_score",
    "load_jsb",
    "merge_tracks",
    "piece_stats",
    "read_midi",
    "score_to_grid",
    "split_of",
    "time_stretch",
    "transpose_grid",
]
