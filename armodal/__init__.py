"""armodal: one shared causal transformer, many modalities.

>>> model = armodal.load("runs/music_bach/<time>/checkpoints/best.ckpt")
>>> out = model.generate(num_samples=4, max_new_tokens=512, temperature=0.9)
>>> midi = model.tokenizer.decode(out.ids[0])
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "load_stage", "ARModel", "__version__"]


def __getattr__(name):  # lazy: importing armodal stays cheap
    if name in ("load", "load_stage"):
        from armodal import api

        return getattr(api, name)
    if name == "ARModel":
        from armodal.ar_model import ARModel

        return ARModel
    raise AttributeError(f"module 'armodal' has no attribute {name!r}")
