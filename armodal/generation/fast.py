"""Compiled decoding: a static KV cache plus a ``torch.compile``-d single-token step.

The eager loop in :func:`armodal.generation.generate` slices the cache to the live
prefix (``kv_len``) so it never attends to empty slots; that makes every step a new
shape, which a compiled graph (and a CUDA graph above all) cannot take.  The fast
path here keeps every shape fixed instead:

* the caches are allocated once, ``max_batch`` x ``max_len`` slots per layer, and kept
  between calls (``model.setup_caches(..., persistent=True)``), so the buffers never move;
* the single-token step attends to the whole static cache with the causal mask row of
  its position (no ``kv_len`` slicing inside the graph), so one graph serves every step;
* the prompt is prefilled separately by the eager forward (variable length).

On CUDA the step is compiled with ``mode="reduce-overhead"``, which captures CUDA
graphs: one replay per token, no per-kernel launch cost.  On the CPU there are no
graphs to capture; the step is compiled in inductor's ``default`` mode (the small ops
fuse), and the linear weights keep the [in, out] layout that :func:`set_weight_layout`
gives them, so every batch-1 product is an MKL GEMV streaming at close to the memory
bandwidth.  (``freeze`` mode would re-pack them into oneDNN's blocked format, which
streams a single row at about half that speed: 24.8 vs 29.5 tok/s at 124M, 2 threads.)

Role: the decode engine (:mod:`.engine`) runs every strategy; a ``FastDecoder`` only
supplies it with persistent static caches and a compiled forward for the fixed-width
calls (the single-token step; the verify width of speculative / lookahead decoding).
``compile=true`` (or ``auto`` where it measures faster, :func:`use_compile`) makes the
engine take the model's decoder from :func:`decoder_for`, which grows its caches to fit
each call.  Usage by hand::

    fast = FastDecoder(model, max_batch=1, max_len=512)
    out = fast.generate(ids, max_new_tokens=256, strategy="greedy")
    # or: armodal.generation.generate(model, ids, config, decoder=fast)

The compiled step reads the weights as they are when it is first called; call
:meth:`FastDecoder.reset` after changing them (e.g. between training and sampling).
"""

from __future__ import annotations

import types
import weakref

import torch

from armodal.generation.config import GenerationConfig
from armodal.generation.engine import GenerationOutput, generate

__all__ = ["FastDecoder", "compile_step", "decoder_for", "default_compile_mode", "release", "set_weight_layout", "use_compile"]


def default_compile_mode(device: torch.device | str) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA, ``default`` on the CPU (keeps the GEMV-friendly weight layout)."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def set_weight_layout(model, layout: str = "in_out") -> int:
    """Re-stride every ``nn.Linear`` weight in place; shapes, values and the state dict stay the same.

    ``in_out`` stores each [out, in] weight column-major (its transpose is contiguous),
    so the batch-1 product ``x @ W.T`` streams the weight as an [in, out] matrix, which
    CPU BLAS runs as a much faster GEMV (about 1.5x on this machine's 124M shapes; HF's
    GPT-2 ``Conv1D`` stores [in, out] for the same reason).  ``out_in`` restores the
    default row-major layout.  Tied embeddings follow the output head (a row lookup
    does not care).  Returns the number of weights changed.
    """
    if layout not in ("in_out", "out_in"):
        raise ValueError(f"layout must be 'in_out' or 'out_in', got {layout!r}")
    changed = 0
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                col = w.dim() == 2 and w.stride() == (1, w.shape[0])
                if layout == "in_out" and not col:
                    w.data = w.data.t().contiguous().t()
                    changed += 1
                elif layout == "out_in" and col:
                    w.data = w.data.contiguous()
                    changed += 1
    return changed


def _decode_one(model, tok: torch.Tensor, typ: torch.Tensor | None, input_pos: torch.Tensor) -> torch.Tensor:
    """One cached step over the full static cache: tok [B, 1], input_pos [1] -> logits [B, 1, V]."""
    return model(tok, types=typ, input_pos=input_pos)


def _fresh(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape).copy_(x)  # standard strides


def compile_step(mode: str = "default", dynamic: bool = False):
    """A ``step(model, tok [B, n], types, input_pos [n]) -> logits [B, n, V]`` compiled with ``mode``.

    ``mode`` is a ``torch.compile`` mode (``default``, ``reduce-overhead``,
    ``max-autotune``, ``max-autotune-no-cudagraphs``; ``default`` is the CPU default),
    ``freeze`` (inductor freezing: prepacked oneDNN weights), or ``eager`` (no compilation:
    the same fixed-shape step, run eagerly, as a reference).
    """
    # each step gets its own code object: dynamo keys its graphs (and its recompile limit of 8) on the code
    # object, so one shared function would run out of recompiles once a process has decoded with a few models
    own = types.FunctionType(_decode_one.__code__.replace(), _decode_one.__globals__, "_decode_one")
    if mode == "eager":
        fn = _decode_one
    elif mode == "freeze":
        fn = torch.compile(own, fullgraph=True, dynamic=dynamic, options={"freezing": True})
    else:
        fn = torch.compile(own, mode=mode, fullgraph=True, dynamic=dynamic)

    graphs = mode in ("reduce-overhead", "max-autotune")  # modes that capture CUDA graphs

    def step(model, tok, typ, input_pos):
        if graphs:  # each call is a new iteration: the previous step's logits were consumed
            torch.compiler.cudagraph_mark_step_begin()
        # fresh contiguous inputs: the engine hands views of its growing sequence, whose
        # strides change every step and would otherwise trigger a recompile each time
        # (``.contiguous()`` is not enough: a [1, 1] view counts as contiguous whatever its strides)
        return fn(model, _fresh(tok), None if typ is None else _fresh(typ), input_pos)

    step.compiled = fn
    return step


class FastDecoder:
    """Persistent static caches plus a compiled fixed-shape forward for one model (see the module docstring).

    ``max_batch`` x ``max_len`` bounds every later call: rows (x2 with classifier-free
    guidance, x num_beams with beam search) and prefix + prompt + new tokens.  Keep
    ``max_len`` near what you need: each step attends to all ``max_len`` slots.  With
    ``grow=True`` (the decoders of :func:`decoder_for`) a larger call re-allocates the
    caches instead of failing; ``max_batch=0`` then allocates on the first call.
    """

    def __init__(
        self,
        model,
        max_batch: int,
        max_len: int | None = None,
        mode: str | None = None,
        weight_layout: str | None = None,
        grow: bool = False,
    ) -> None:
        self._model = weakref.ref(model)  # the registry below must not keep models alive
        self.max_batch = int(max_batch)
        self.max_len = int(max_len or model.config.max_seq_len)
        self.grow = grow
        device = next(model.parameters()).device
        self.mode = mode or default_compile_mode(device)
        # CPU: [in, out] weights make batch-1 GEMVs stream faster; CUDA: leave cuBLAS its layout
        self.weight_layout = weight_layout or ("in_out" if device.type == "cpu" else None)
        if self.weight_layout:
            set_weight_layout(model, self.weight_layout)
        self.step = compile_step(self.mode)
        if self.max_batch:
            self._setup()

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this FastDecoder no longer exists")
        return model

    def _setup(self) -> None:
        self.model.setup_caches(self.max_batch, self.max_len, persistent=True)

    def ensure(self, rows: int, length: int) -> None:
        """Make the caches hold ``rows`` x ``length`` (grow them, or fail with the bounds)."""
        if rows > self.max_batch or length > self.max_len:
            if not self.grow:
                raise ValueError(
                    f"this call needs {rows} rows x {length} positions; the decoder was built for "
                    f"max_batch={self.max_batch} x max_len={self.max_len}"
                )
            fresh = self.max_batch == 0
            self.max_batch = max(rows, self.max_batch)
            want = min(-(-length // 64) * 64, self.model.config.max_seq_len)  # round up: fewer re-allocations
            self.max_len = want if fresh else max(want, self.max_len)
            self._setup()
        elif not self.model.has_caches or not self.model.caches_persistent:  # someone cleared them: put them back
            self._setup()
        self.model.eval()

    def reset(self) -> None:
        """Recompile from scratch (after the weights changed) and re-zero the caches."""
        torch.compiler.reset()
        self.step = compile_step(self.mode)
        if self.max_batch:
            self._setup()

    def close(self) -> None:
        """Release the caches: the model goes back to the plain forward."""
        self.model.clear_caches()
        if _DECODERS.get(self.model) is self:
            del _DECODERS[self.model]

    def generate(self, ids: torch.Tensor | None = None, config: GenerationConfig | None = None, **kwargs) -> GenerationOutput:
        """:func:`armodal.generation.generate` through this decoder; same arguments."""
        if kwargs.get("use_cache", True) is False:
            raise ValueError("FastDecoder always decodes with its static cache")
        return generate(self.model, ids, config, decoder=self, **kwargs)


# ----------------------------------------------------------------------------- the engine's choice
_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, FastDecoder]" = weakref.WeakKeyDictionary()


def decoder_for(model) -> FastDecoder:
    """The model's shared, growing decoder (compiled step, persistent caches), built on first use."""
    dec = _DECODERS.get(model)
    if dec is None:
        dec = _DECODERS[model] = FastDecoder(model, max_batch=0, grow=True)
    return dec


def release(model) -> bool:
    """Close the model's :func:`decoder_for` decoder, if it has one (frees its caches)."""
    dec = _DECODERS.get(model)
    if dec is None:
        return False
    dec.close()
    return True


def use_compile(config: GenerationConfig, device: torch.device | str, strategy: str | None = None) -> bool:
    """Whether ``config.compile`` turns the compiled step on for this device and strategy.

    ``true`` / ``false`` are obeyed; ``auto`` turns it on only where it measured faster
    (see docs/bench_generation_*.json): on CUDA (CUDA graphs remove the per-kernel launch
    cost that dominates small-batch decoding); not on the CPU, where inductor's compile
    (tens of seconds) outweighs its per-token saving at the lengths these models generate.
    """
    if config.compile != "auto":
        return config.compile == "true"
    return torch.device(device).type == "cuda" and config.quantize != "int8_dynamic"  # torch.ao modules do not compile
