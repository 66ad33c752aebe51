"""The shared decoder-only transformer.

It knows nothing about modalities: it maps token ids (plus an optional continuous
prefix and an optional per-token type stream) to next-token logits.  Loss lives in
:mod:`armodal.training`, decoding in :mod:`armodal.generation`.

Shapes: B batch, P prefix length, T token length, S = P + T, D d_model,
H heads, Hkv key/value heads, Dh head dim, V vocab size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from armodal.models.kv_cache import KVCache
from armodal.utils.safety import constructible

__all__ = ["TransformerConfig", "Transformer", "build_transformer"]


# ----------------------------------------------------------------------------- config
@dataclass
class TransformerConfig:
    vocab_size: int = 256  # token vocabulary; injected from the modality's tokenizer
    num_types: int = 0  # size of the per-token type vocabulary (voice, channel, 2D cell); 0 = off
    n_layer: int = 4  # number of transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head
    d_model: int = 128  # residual stream width
    ffn_hidden: int | None = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up to 64
    max_seq_len: int = 1024  # longest prefix + token sequence (RoPE table, cache bound)
    rope_base: float = 10000.0  # RoPE frequency base
    dropout: float = 0.0  # residual dropout (training only)
    attn_dropout: float | None = None  # attention-probability dropout; None = same as dropout (0 keeps CPU SDPA fast)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # share the input embedding with the output projection
    init_std: float = 0.02  # normal init std; residual projections are scaled by 1/sqrt(2 n_layer)
    extra: dict = field(default_factory=dict)  # free-form notes carried with the config

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.ffn_hidden is None:
            hidden = int(8 * self.d_model / 3)
            self.ffn_hidden = 64 * math.ceil(hidden / 64)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_cache(max_len: int, head_dim: int, base: float) -> torch.Tensor:
    """cos/sin table [max_len, Dh/2, 2] in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [L, Dh/2]
    return torch.stack([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, Dh], rope [S, Dh/2, 2] -> rotated x (pairs of adjacent channels)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, H, S, Dh/2, 2]
    cos, sin = rope[..., 0], rope[..., 1]  # [S, Dh/2]
    out = torch.stack(
        [xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1
    )
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,  # [B, S, D]
        rope: torch.Tensor,  # [S, Dh/2, 2]
        mask: torch.Tensor | None,  # [1, 1, S, L] bool (cached) or None (plain causal over slots [0, S))
        input_pos: torch.Tensor | None,  # [S] absolute positions (cached) or None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, s, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, S, Dh]
        k = k.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, Hkv, S, Dh]
        v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, L, Dh]
            n = s if mask is None else mask.shape[-1]  # mask None: prefill of slots [0, s), plain causal
            if n < k.shape[2]:  # attend to a prefix of the cache only
                k, v = k[:, :, :n], v[:, :, :n]
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=s > 1, dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa
            )
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, input_pos):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, mask, input_pos))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# ----------------------------------------------------------------------------- model
class Transformer(nn.Module):
    """Decoder-only transformer: ``forward(ids, prefix=None, types=None, input_pos=None) -> logits``.

    * ``prefix`` [B, P, D]: continuous embeddings placed before the token embeddings
      (class embeddings, image features...).  Logits are returned for all S = P + T
      positions; position ``P - 1 + t`` predicts token ``t``.
    * ``types`` [B, T]: optional per-token type ids, embedded and added to the tokens.
    * ``input_pos`` [S]: absolute positions; only with caches set up (``setup_caches``).
      Without caches the model runs the plain causal forward from position 0.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.num_types, cfg.d_model) if cfg.num_types > 0 else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.register_buffer("rope", rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_base), persistent=False)
        self.causal_mask: torch.Tensor | None = None
        self.caches_persistent = False  # set by setup_caches(persistent=True): decode calls keep and reuse them
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, self.config.init_std)

    # -- caches --------------------------------------------------------------------
    def setup_caches(
        self, max_batch: int, max_len: int | None = None, dtype: torch.dtype | None = None, persistent: bool = False
    ) -> None:
        """Allocate a static KV cache of ``max_batch`` x ``max_len`` slots in every layer.

        ``persistent`` caches outlive a decode call: the decode engine reuses them while
        they are large enough (compiled steps need buffers that never move); plain ones
        are dropped by the call that set them up.
        """
        max_len = max_len or self.config.max_seq_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds max_seq_len={self.config.max_seq_len}")
        ref = self.tok_emb.weight
        dtype = dtype or ref.dtype
        for blk in self.blocks:
            a = blk.attn
            blk.attn.kv_cache = KVCache(max_batch, max_len, a.n_kv_head, a.head_dim, dtype, ref.device)
        self.causal_mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=ref.device))
        self.caches_persistent = persistent

    def clear_caches(self) -> None:
        """Drop the caches: the model goes back to the plain causal forward."""
        for blk in self.blocks:
            blk.attn.kv_cache = None
        self.causal_mask = None
        self.caches_persistent = False

    @property
    def has_caches(self) -> bool:
        return self.causal_mask is not None

    def reorder_caches(self, index: torch.Tensor) -> None:
        for blk in self.blocks:
            blk.attn.kv_cache.reorder(index)

    # -- forward ---------------------------------------------------------------------
    def embed(self, ids: torch.Tensor | None, prefix: torch.Tensor | None, types: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if prefix is not None:
            parts.append(prefix.to(self.tok_emb.weight.dtype))  # [B, P, D]
        if ids is not None and ids.shape[-1] > 0:
            x = self.tok_emb(ids)  # [B, T, D]
            if types is not None:
                if self.type_emb is None:
                    raise ValueError("types were given but the model was built with num_types=0")
                x = x + self.type_emb(types)
            parts.append(x)
        if not parts:
            raise ValueError("forward needs ids or a prefix")
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def forward(
        self,
        ids: torch.Tensor | None,  # [B, T] long
        prefix: torch.Tensor | None = None,  # [B, P, D]
        types: torch.Tensor | None = None,  # [B, T] long
        input_pos: torch.Tensor | None = None,  # [S] long, cached decoding only
        kv_len: int | None = None,  # attend to cache slots [0, kv_len) only (eager speed-up)
        num_logits: int | None = None,  # return logits for the last num_logits positions only
    ) -> torch.Tensor:  # [B, S or num_logits, V]
        x = self.drop(self.embed(ids, prefix, types))  # [B, S, D]
        s = x.shape[1]
        if input_pos is None:
            if s > self.config.max_seq_len:
                raise ValueError(f"sequence of {s} positions exceeds max_seq_len={self.config.max_seq_len}")
            rope, mask = self.rope[:s], None
        else:
            if not self.has_caches:
                raise RuntimeError("input_pos given but no caches: call setup_caches() first")
            rope = self.rope[input_pos]
            if kv_len is not None and kv_len == s:
                # S distinct positions inside [0, S): they are 0..S-1, so the mask is plain causal;
                # no mask lets SDPA take its flash / is_causal kernel (prefill, time to first token)
                mask = None
            else:
                mask = self.causal_mask[input_pos]  # [S, L]
                if kv_len is not None:
                    mask = mask[:, :kv_len]
                mask = mask[None, None]  # [1, 1, S, L]
        for blk in self.blocks:
            x = blk(x, rope, mask, input_pos)
        if num_logits is not None:
            x = x[:, -num_logits:]
        return self.lm_head(self.norm(x))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.type_emb is not None:
                n -= self.type_emb.weight.numel()
        return n


@constructible
def build_transformer(**kwargs) -> Transformer:
    """Hydra entry point: flat config keys -> :class:`Transformer`."""
    return Transformer(TransformerConfig(**kwargs))


def config_dict(cfg: TransformerConfig) -> dict:
    return asdict(cfg)
