"""Music modality: MIDI event tokenizers (miditok), the JSB chorales benchmark, samplers, metrics."""

from armodal.modalities.music.jsb import JSBDataModule, JSBTokenizer, grid_to_score, load_jsb, score_to_grid, transpose_grid
from armodal.modalities.music.midi_io import BadMidiError, read_midi
from armodal.modalities.music.sampler import MusicSampler

__all__ = [
    "BadMidiError",
    "JSBDataModule",
    "JSBTokenizer",
    "MusicSampler",
    "grid_to_score",
    "load_jsb",
    "read_midi",
    "score_to_grid",
    "transpose_grid",
]
