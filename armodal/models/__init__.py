"""The shared transformer and its KV cache."""

from armodal.models.kv_cache import KVCache
from armodal.models.transformer import Transformer, TransformerConfig, build_transformer

__all__ = ["KVCache", "Transformer", "TransformerConfig", "build_transformer"]
