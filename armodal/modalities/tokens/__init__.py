"""Generic ``tokens`` modality: pre-tokenized integer sequences (.npy / .bin + vocab.json).

Modules: ``tokenizer``, ``data``, ``sampler``, ``evaluate`` (the skeleton every modality shares).
"""

from armodal.modalities.tokens.data import TokensDataModule, read_token_file, write_toy_corpus
from armodal.modalities.tokens.evaluate import TokensEvaluator
from armodal.modalities.tokens.sampler import TokensSampler
from armodal.modalities.tokens.tokenizer import TokensTokenizer

__all__ = [
    "TokensDataModule",
    "TokensEvaluator",
    "TokensSampler",
    "TokensTokenizer",
    "read_token_file",
    "write_toy_corpus",
]
