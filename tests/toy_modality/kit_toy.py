"""Contract kit for the toy modality: the same suite as the built-in modalities runs on it."""

from __future__ import annotations

from tests.toy_modality import CONF_DIR, ToyDataModule, ToyTokenizer

MODALITY = "toy"
EXPERIMENTS = ("toy_motifs",)
CONFIG_DIR = CONF_DIR


def tokenizers(tmp):
    return {"toy": (ToyTokenizer("xyz"), ["xyzzy", ""])}


def datamodules(tmp):
    return {"toy": ToyDataModule(n_train=16, n_val=4)}


def experiments(tmp):
    return {"toy_motifs": []}
