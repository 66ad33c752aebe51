"""Weight quantisation for decoding: int8 or int4 weights, computed by PyTorch's own kernels.

Decoding one token at a time streams every weight once per step, so on the CPU it is bound
by memory traffic, not arithmetic (docs/PERFORMANCE.md).  Storing the linear weights in
fewer bits cuts those bytes; the products run in kernels that PyTorch maintains:

============  =====================================================================  ==========================
mode          weights / activations                                                  CPU kernel
============  =====================================================================  ==========================
``int8``      int8, one scale per output channel (symmetric); activations bf16      ``aten._weight_int8pack_mm``
``int4``      4-bit, one scale + zero per ``group_size`` inputs; activations bf16  ``aten._weight_int4pack_mm_for_cpu``
``int8_dynamic``  int8 per channel; activations quantised to int8 per call (fbgemm) ``torch.ao`` dynamic ``Linear``
============  =====================================================================  ==========================

``int8`` and ``int4`` are weight-only: each row of a batch is computed on its own, so a
sample does not depend on what else is in the batch.  ``int8_dynamic`` quantises the
activations with one scale per call (the whole batch): the int8 GEMM is the fastest
batched product on this CPU, but a row's rounding depends on the other rows.  It runs in
the eager engine only (the ``torch.ao`` modules do not compile).

On other devices ``int8`` dequantises inside the product (``x @ q.T * scale``), which
``torch.compile`` fuses; ``int4`` is CPU-only (its packing is the CPU kernel's).  Everything outside the linear layers
(embeddings, norms, attention, the KV cache) stays in the model's dtype.  The tied
output head gets its own quantised copy; the embedding lookup keeps the original rows.

Usage::

    quantize_weights(net, "int8")        # in place; returns a summary dict
    FastDecoder(net, max_batch=1, ...)   # or the eager engine: both see ordinary modules
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QUANTIZE_MODES", "Int8WeightLinear", "Int4WeightLinear", "quantize_weights", "quantized", "weight_bytes"]

QUANTIZE_MODES = ("none", "int8", "int4", "int8_dynamic")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]


class Int8WeightLinear(nn.Module):
    """``y = x @ (q * scale).T`` with ``q`` int8 [out, in] and one fp scale per output channel."""

    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [out]
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", q.contiguous())  # [out, in] int8
        self.register_buffer("scale", scale.to(compute_dtype))  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        shape = (*x.shape[:-1], self.out_features)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(_rows(x).to(self.compute_dtype), self.qweight, self.scale)
        else:
            y = F.linear(_rows(x), self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y.to(x.dtype).reshape(shape)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4WeightLinear(nn.Module):
    """4-bit weights, asymmetric, one (scale, zero) per ``group_size`` inputs of each output channel.

    Stored in PyTorch's CPU int4 packing (``_convert_weight_to_int4pack_for_cpu``); the value
    of a 4-bit code ``c`` is ``(c - 8) * scale + zero`` (the convention of that kernel).
    """

    def __init__(self, weight: torch.Tensor, group_size: int = 64, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        w = weight.detach().float()
        out_features, k = w.shape
        if k % group_size:
            raise ValueError(f"int4: in_features={k} is not a multiple of group_size={group_size}")
        w = F.pad(w, (0, 0, 0, -out_features % 16))  # the packing takes rows in 16s (a 50257 vocab is padded)
        n = w.shape[0]
        g = w.reshape(n, k // group_size, group_size)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(1e-12)
        codes = torch.round((g - lo) / scale).clamp_(0, 15).to(torch.int32).reshape(n, k)
        zero = lo + 8 * scale
        self.in_features, self.out_features, self.group_size = k, out_features, group_size
        self.compute_dtype = compute_dtype
        # [k/g, n, 2]: scale and zero of each group, as the kernel wants them
        sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()
        self.register_buffer("scale_zero", sz.to(compute_dtype))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(self.compute_dtype), self.packed, self.group_size, self.scale_zero)
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] that the kernel multiplies by (read back through the kernel)."""
        eye = torch.eye(self.in_features, device=self.packed.device)
        return self._mm(eye).float().t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if x.device.type != "cpu":
            raise RuntimeError("quantize=int4 uses PyTorch's CPU int4 kernel; use int8 on other devices")
        return self._mm(_rows(x)).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


def _linears(net: nn.Module):
    for name, mod in net.named_modules():
        for child_name, child in mod.named_children():
            if type(child) is nn.Linear:
                yield mod, child_name, f"{name}.{child_name}" if name else child_name, child


def _stored(net: nn.Module):
    """Every stored weight tensor once: parameters, persistent buffers, fbgemm-packed int8 weights."""
    seen = set()
    for mod in net.modules():
        tensors = list(mod._parameters.values())
        tensors += [b for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set]
        packed = getattr(mod, "_packed_params", None)
        if packed is not None and hasattr(mod, "weight") and callable(mod.weight):
            w = mod.weight()  # quantized per-channel int8: 1 byte per weight + a scale per channel
            yield mod, w.data_ptr(), w.numel() + 4 * w.shape[0]
        for t in tensors:
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                yield mod, t.data_ptr(), t.numel() * t.element_size()


def weight_bytes(net: nn.Module, decode_step: bool = False) -> int:
    """Bytes of the stored weights (tied ones once).

    ``decode_step=True``: the bytes one decoding step reads, i.e. without an embedding table that is
    only looked up by row (one the output head does not share, as after quantisation).
    """
    skip = None
    emb = getattr(net, "tok_emb", None)
    if decode_step and emb is not None and getattr(getattr(net, "lm_head", None), "weight", None) is not emb.weight:
        skip = emb.weight.data_ptr()
    return sum(n for _, ptr, n in _stored(net) if ptr != skip)


@torch.no_grad()
def quantize_weights(net: nn.Module, mode: str = "int8", group_size: int = 64,
                     compute_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Replace every ``nn.Linear`` of ``net`` (bias-free, as in :mod:`armodal.models`) in place.

    ``mode`` is one of :data:`QUANTIZE_MODES` (``none`` leaves the model alone).  Returns
    ``{"mode", "linears", "bytes_before", "bytes_after"}``.  Biases are not supported
    (the shared transformer has none) and raise.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    before = weight_bytes(net)
    if mode == "none":
        return {"mode": mode, "linears": 0, "bytes_before": before, "bytes_after": before}
    targets = list(_linears(net))
    for _, _, full, lin in targets:
        if lin.bias is not None:
            raise ValueError(f"quantize={mode}: {full} has a bias, which these kernels do not take")
    if mode == "int8_dynamic":
        if next(net.parameters()).device.type != "cpu":
            raise ValueError("quantize=int8_dynamic runs on the CPU only (fbgemm); use int8 on other devices")
        with warnings.catch_warnings():  # torch.ao announces its move to torchao; the kernels are the same
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynLinear
            from torch.ao.quantization import per_channel_dynamic_qconfig

            for parent, child_name, _, lin in targets:
                lin.qconfig = per_channel_dynamic_qconfig
                setattr(parent, child_name, DynLinear.from_float(lin))
    else:
        for parent, child_name, _, lin in targets:
            q = Int8WeightLinear(lin.weight, compute_dtype) if mode == "int8" else \
                Int4WeightLinear(lin.weight, group_size, compute_dtype)
            setattr(parent, child_name, q.to(lin.weight.device))
    net.quantized = mode
    return {"mode": mode, "linears": len(targets), "bytes_before": before, "bytes_after": weight_bytes(net)}


def _weights_version(net: nn.Module) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in net.parameters())


def quantized(net: nn.Module, mode: str) -> nn.Module:
    """A quantised copy of ``net`` for decoding (``net`` itself for ``none``), cached on ``net``.

    The copy is rebuilt when ``net``'s weights change (any parameter replaced or updated in
    place, as by an optimizer step), so sampling during training sees the current weights.
    ``net`` is never modified; the copy costs the quantised bytes (a quarter of fp32 for int8).
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "none":
        return net
    cache = net.__dict__.setdefault("_armodal_quantized", {})
    version = _weights_version(net)
    hit = cache.get(mode)
    if hit is None or hit[0] != version:
        q = copy.deepcopy(net)
        q.__dict__.pop("_armodal_quantized", None)
        quantize_weights(q, mode)
        cache.clear()  # one quantised copy at a time
        cache[mode] = (version, q.eval())
    return cache[mode][1]
