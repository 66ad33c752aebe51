"""A minimal modality that lives outside the package, to prove that a modality only adds files.

It has the skeleton of the built-in ones (``tokenizer``, ``data``, ``sampler``, ``evaluate``),
registers its parts under the short name ``toy`` from here, and brings its own config folder
(``conf/``: ``modality/toy.yaml``, ``experiment/toy_motifs.yaml``) that Hydra finds through its
search path.  The data are strings over ``abcd`` made of a repeated 2- or 3-letter motif.
"""

from pathlib import Path

from tests.toy_modality.data import ToyDataModule, motif_strings
from tests.toy_modality.evaluate import ToyEvaluator, is_periodic
from tests.toy_modality.sampler import ToySampler
from tests.toy_modality.tokenizer import ToyTokenizer

CONF_DIR = Path(__file__).resolve().parent / "conf"

__all__ = ["CONF_DIR", "ToyDataModule", "ToyEvaluator", "ToySampler", "ToyTokenizer", "is_periodic", "motif_strings"]
