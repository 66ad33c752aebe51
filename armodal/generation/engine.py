"""The decode engine: prefill, the token step and the caches, written once for every strategy.

An :class:`Engine` wraps one network for one decode call.  It owns

* the caches (temporary ones, or the persistent static ones of a
  :class:`~armodal.generation.fast.FastDecoder` when the compiled step is on);
* classifier-free guidance by doubling the batch: every forward runs the
  conditional and the unconditional rows together and returns the mixed logits;
* the per-token type stream (``types_fn``), the grammar mask (``allowed_fn``) and the
  style rules behind ``rule_penalty`` (``flagged_fn``);
* the logits processors of the :class:`GenerationConfig` (:meth:`Engine.process`).

A strategy (:mod:`.sampling`, :mod:`.beam`, :mod:`.speculative`, :mod:`.lookahead`)
only decides which tokens to feed and which to keep.  Cache slots are indexed by
position, so a strategy rolls back simply by feeding from an earlier position:
stale slots lie after the current position (masked) and are overwritten.

:func:`generate` is the front door of the package: it picks the strategy named by
``config.strategy``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from armodal.generation.config import GenerationConfig
from armodal.generation.processors import cfg_mix, probs, process, sample

__all__ = ["Engine", "GenerationOutput", "Tokens", "generate", "seeded_generator", "weights_for"]

TypesFn = Callable[[torch.Tensor], "torch.Tensor | None"]  # ids [B, t] -> types [B, t] (causal)
AllowedFn = Callable[[torch.Tensor], "torch.Tensor | None"]  # ids [B, t] -> bool [B, V]
FlaggedFn = Callable[[torch.Tensor, str], torch.Tensor]  # (ids [B, t], rule) -> bool [B, V]: tokens the rule flags next
StreamFn = Callable[[int, torch.Tensor], None]  # (step, new ids [B]) -> None
ProbsFn = Callable[[torch.Tensor, torch.Tensor], None]  # (ids so far [B, t], distribution of the next id [B, V]) -> None


@dataclass
class GenerationOutput:
    ids: torch.Tensor  # [B, T + N] prompt then generated ids (pad after EOS)
    lengths: torch.Tensor  # [B] number of valid ids per row (prompt + generated, EOS included)
    finished: torch.Tensor  # [B] bool: stopped on EOS
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Tokens:
    """What the engine needs to know about the vocabulary (shared by a target and its draft)."""

    eos_id: int | None = None
    pad_id: int = 0
    types_fn: TypesFn | None = None
    allowed_fn: AllowedFn | None = None
    flagged_fn: FlaggedFn | None = None  # the style rules behind GenerationConfig.rule_penalty


class Engine:
    """One network's state for one decode call (see the module docstring).

    ``prefix`` / ``uncond_prefix`` [B, P, D] are per prompt; :meth:`expand` repeats
    them for several rows per prompt (samples, beams).  ``decoder`` is a
    :class:`~armodal.generation.fast.FastDecoder`: its compiled step runs the forwards
    whose width (tokens fed at once) is in ``compiled_widths``; the others, and the
    prefill, run the eager forward over the same caches.
    """

    def __init__(
        self,
        net,
        config: GenerationConfig,
        tokens: Tokens = Tokens(),
        *,
        prefix: torch.Tensor | None = None,
        uncond_prefix: torch.Tensor | None = None,
        decoder=None,
        compiled_widths: tuple[int, ...] = (1,),
        on_probs: ProbsFn | None = None,
    ) -> None:
        self.net, self.config, self.tokens = net, config, tokens
        self.on_probs = on_probs
        self.device = next(net.parameters()).device
        self.cfg = config.cfg_scale != 1.0
        if self.cfg and (prefix is None or uncond_prefix is None):
            raise ValueError(f"cfg_scale={config.cfg_scale} needs a conditional prefix and an unconditional one")
        self.prefix = None if prefix is None else prefix.to(self.device)
        self.uncond = None if not self.cfg else uncond_prefix.to(self.device)
        self.decoder = decoder
        self.compiled_widths = set(compiled_widths)

    # -- shapes ----------------------------------------------------------------------
    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    def expand(self, n: int, ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Give every prompt ``n`` adjacent rows: repeat the prefixes (and return ``ids`` repeated)."""
        if n > 1 and self.prefix is not None:
            self.prefix = self.prefix.repeat_interleave(n, 0)
            if self.uncond is not None:
                self.uncond = self.uncond.repeat_interleave(n, 0)
        return None if ids is None else ids.repeat_interleave(n, 0) if n > 1 else ids

    def _dup(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or not self.cfg else torch.cat([x, x], 0)

    def _rows(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return x if not self.cfg else self._dup(x)

    def _mix(self, logits: torch.Tensor) -> torch.Tensor:  # [rows, n, V] -> [B, n, V]
        if not self.cfg:
            return logits
        b = logits.shape[0] // 2
        return cfg_mix(logits[:b], logits[b:], self.config.cfg_scale)

    def _types(self, seq: torch.Tensor, start: int) -> torch.Tensor | None:
        fn = self.tokens.types_fn
        if fn is None:
            return None
        typ = fn(seq)
        return None if typ is None else typ[:, start:]

    # -- caches ----------------------------------------------------------------------
    @contextmanager
    def caches(self, batch: int, length: int) -> Iterator["Engine"]:
        """Caches for ``batch`` rows (x2 with guidance) and ``length`` positions for the call.

        With a decoder its persistent static caches serve (grown if needed) and stay; a
        model holding persistent caches that are large enough reuses them; otherwise
        temporary caches are set up and dropped afterwards.
        """
        rows = batch * (2 if self.cfg else 1)
        net = self.net
        if length > net.config.max_seq_len:
            raise ValueError(f"this call needs {length} positions, more than max_seq_len={net.config.max_seq_len}")
        if self.decoder is not None:
            self.decoder.ensure(rows, length)
            yield self
            return
        if net.has_caches and net.caches_persistent:
            from armodal.generation.fast import release

            kv = net.blocks[0].attn.kv_cache
            if kv.k.shape[0] >= rows and kv.max_len >= length:
                yield self
                return
            if not release(net):  # the engine's own decoder steps aside; a user's FastDecoder is theirs
                raise ValueError(
                    f"the model holds persistent caches of {kv.k.shape[0]} rows x {kv.max_len} positions (a FastDecoder); "
                    f"this call needs {rows} x {length}: close() that decoder or build a larger one"
                )
        net.setup_caches(rows, length)
        try:
            yield self
        finally:
            net.clear_caches()

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder the rows of the caches (beam search); ``index`` [B] picks rows of [B]."""
        if self.cfg:
            index = torch.cat([index, index + self.batch_rows], 0)
        self.net.reorder_caches(index)

    # -- forwards --------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed the prefix and the prompt ids [B, T] (T may be 0): logits [B, V] for the next token."""
        self.batch_rows = ids.shape[0]
        t0, p = ids.shape[1], self.prefix_len
        s0 = p + t0
        full_prefix = self.prefix if not self.cfg else torch.cat([self.prefix, self.uncond.to(self.prefix)], 0)
        logits = self.net(
            self._rows(ids) if t0 else None,
            prefix=full_prefix,
            types=self._rows(self._types(ids, 0)) if t0 else None,
            input_pos=torch.arange(s0, device=self.device),
            kv_len=s0,
            num_logits=1,
        )
        return self._mix(logits)[:, -1]

    def forward(self, seq: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``seq[:, start:]`` at its positions (cached): logits [B, n, V], one per fed token.

        ``seq`` [B, t] is the whole token sequence so far (the type stream is computed on it).
        """
        tok = seq[:, start:]
        n = tok.shape[1]
        pos0 = self.prefix_len + start
        input_pos = torch.arange(pos0, pos0 + n, device=self.device)
        tok, typ = self._rows(tok), self._rows(self._types(seq, start))
        if self.decoder is not None and n in self.compiled_widths:
            logits = self.decoder.step(self.net, tok, typ, input_pos)
        else:
            logits = self.net(tok, types=typ, input_pos=input_pos, kv_len=pos0 + n)
        return self._mix(logits)

    def forward_uncached(self, seq: torch.Tensor) -> torch.Tensor:
        """The whole sequence from scratch, no cache (the reference path): logits [B, V] of the last position."""
        full_prefix = self.prefix if not self.cfg else torch.cat([self.prefix, self.uncond.to(self.prefix)], 0)
        logits = self.net(self._rows(seq) if seq.shape[1] else None, prefix=full_prefix,
                          types=self._rows(self._types(seq, 0)) if seq.shape[1] else None)
        return self._mix(logits[:, -1:])[:, -1]

    # -- choosing --------------------------------------------------------------------
    def process(self, logits: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] for the token after ``seq`` [B, t] -> processed logits (penalty, grammar, filters)."""
        cfg = self.config
        prev = seq if cfg.repetition_penalty != 1.0 else None
        allowed = self.tokens.allowed_fn(seq) if self.tokens.allowed_fn is not None else None
        flagged = None
        if cfg.rule_penalty:
            if self.tokens.flagged_fn is None:
                raise ValueError(f"rule_penalty={cfg.rule_penalty}: this decode call has no style rules (Tokens.flagged_fn)")
            flagged = {rule: self.tokens.flagged_fn(seq, rule) for rule in cfg.rule_penalty}
        return process(logits, cfg, prev, allowed, flagged)

    def choose(self, logits: torch.Tensor, seq: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The next token [B] after ``seq``: argmax or a draw from the processed distribution (which
        ``on_probs``, when set, receives first)."""
        processed = self.process(logits, seq)
        if self.on_probs is not None:
            self.on_probs(seq, probs(processed, self.config))
        return sample(processed, self.config, generator)


# ----------------------------------------------------------------------------- front door
def _inputs(net, ids: torch.Tensor | None, prefix: torch.Tensor | None) -> torch.Tensor:
    if ids is None and prefix is None:
        raise ValueError("generate needs prompt ids, a prefix, or both")
    device = next(net.parameters()).device
    if ids is None:
        ids = torch.zeros(prefix.shape[0], 0, dtype=torch.long, device=device)
    if ids.dim() != 2:
        raise ValueError(f"prompt ids must be [B, T], got shape {tuple(ids.shape)}")
    if prefix is not None and prefix.shape[0] != ids.shape[0]:
        raise ValueError(f"{ids.shape[0]} prompts but {prefix.shape[0]} prefixes")
    return ids.to(device)


def generate(
    net,
    ids: torch.Tensor | None = None,  # [B, T] prompt (may be empty when a prefix is given)
    config: GenerationConfig | None = None,
    *,
    prefix: torch.Tensor | None = None,  # [B, P, D]
    uncond_prefix: torch.Tensor | None = None,  # [B, P, D], for classifier-free guidance
    tokens: Tokens | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    types_fn: TypesFn | None = None,
    allowed_fn: AllowedFn | None = None,
    num_return_sequences: int = 1,
    generator: torch.Generator | None = None,
    stream: StreamFn | None = None,
    draft=None,
    decoder=None,
    use_cache: bool = True,
    on_probs: ProbsFn | None = None,
    **overrides,
) -> GenerationOutput:
    """Decode with the strategy ``config.strategy`` (overrides: any :class:`GenerationConfig` field).

    * ``num_return_sequences`` rows per prompt (samples; beam: the best hypotheses).
    * ``draft``: for ``speculative``, a network sharing the vocabulary, or a
      :class:`~armodal.generation.speculative.Draft` (network + its own prefixes).
    * ``decoder``: a :class:`~armodal.generation.fast.FastDecoder` to use for this net
      (else ``config.compile`` decides; see :func:`armodal.generation.fast.decoder_for`).
    * ``use_cache=False``: the uncached reference loop (``sample`` / ``greedy`` only).
    * ``on_probs(ids, p)``: called at every step with the ids so far [B, t] and the processed
      distribution [B, V] the next id comes from (for ``speculative`` / ``lookahead``: the target's
      distribution at each kept position, of which the verified token is an exact draw; not ``beam``) --
      e.g. to average a function of the next token exactly instead of over the draw (Rao-Blackwellised).
    * ``generator``: else one seeded from ``config.seed``, else torch's global RNG.
    * ``config.quantize``: the target (and the draft) decode with a quantised copy of their weights
      (:func:`weights_for`); ``net`` itself is never modified.
    """
    from armodal.generation import beam, lookahead, sampling, speculative
    from armodal.generation.fast import decoder_for, use_compile

    config = (config or GenerationConfig()).replace(**overrides)
    if decoder is not None and config.quantize != "none" and getattr(net, "quantized", None) != config.quantize:
        raise ValueError(f"quantize={config.quantize}: a FastDecoder serves the weights it was built on; build it on "
                         "armodal.generation.quantize.quantized(net, mode) instead")
    net = weights_for(net, config)
    if tokens is None:
        tokens = Tokens(eos_id, pad_id, types_fn, allowed_fn)
    ids = _inputs(net, ids, prefix)
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if generator is None:
        generator = seeded_generator(config, ids.device)
    strategy = config.strategy
    if not use_cache and strategy not in ("sample", "greedy"):
        raise ValueError(f"use_cache=False is the reference loop of sample/greedy, not of strategy={strategy}")
    if on_probs is not None and strategy == "beam":
        raise ValueError("on_probs sees the distribution each kept token was drawn from; beam search keeps "
                         "hypotheses, not draws (use it with sample, greedy, speculative or lookahead)")
    if decoder is None and use_cache and use_compile(config, ids.device, strategy):
        decoder = decoder_for(net)
    engine = Engine(net, config, tokens, prefix=prefix, uncond_prefix=uncond_prefix, decoder=decoder,
                    compiled_widths=_compiled_widths(config), on_probs=on_probs)
    max_new = _max_new(net, config, ids, engine.prefix_len)
    run = dict(max_new=max_new, generator=generator, stream=stream)
    if strategy == "beam":
        return beam.beam_search(engine, ids, num_return=num_return_sequences, **run)
    # deterministic strategies decode each prompt once and repeat the rows
    reps, n = (num_return_sequences, 1) if _deterministic(config) else (1, num_return_sequences)
    if on_probs is not None and reps > 1:  # the observer sees the rows of the output
        engine.on_probs = lambda seq, p: on_probs(seq.repeat_interleave(reps, 0), p.repeat_interleave(reps, 0))
    if strategy in ("sample", "greedy"):
        out = sampling.decode(engine, ids, num_return=n, use_cache=use_cache, **run)
    elif strategy == "speculative":
        if draft is None:
            raise ValueError("strategy=speculative needs a draft model (draft_ckpt= in ARModel.generate / armodal-generate)")
        out = speculative.decode(engine, speculative.as_draft(draft, net, config, tokens, ids.device),
                                 ids, num_return=n, **run)
    else:
        out = lookahead.decode(engine, ids, num_return=n, **run)
    return _repeat(out, reps)


def weights_for(net, config: GenerationConfig):
    """The network to decode with: ``net``, or its quantised copy (cached on ``net``) for ``config.quantize``.

    A network that is quantised already (an export written with ``quantize=``) decodes as it is; asking it for
    another mode is an error naming both.
    """
    from armodal.generation.quantize import quantized

    mode, have = config.quantize, getattr(net, "quantized", None)
    if have:
        if mode not in ("none", have):
            raise ValueError(f"quantize={mode}: this model's weights are already {have} (a quantised export); "
                             f"use quantize={have} or none, or the full-precision checkpoint")
        return net
    if mode == "int4" and next(net.parameters()).device.type != "cpu":
        raise ValueError("quantize=int4 runs on PyTorch's CPU int4 kernel only; use quantize=int8 on "
                         f"{next(net.parameters()).device}")
    return quantized(net, mode)


def seeded_generator(config: GenerationConfig, device) -> torch.Generator | None:
    """A generator seeded with ``config.seed`` (None: use torch's global RNG)."""
    return None if config.seed is None else torch.Generator(device=device).manual_seed(config.seed)


def _deterministic(config: GenerationConfig) -> bool:
    return config.is_greedy and config.strategy != "beam"


def _compiled_widths(config: GenerationConfig) -> tuple[int, ...]:
    """Forward widths that use the compiled step: the single-token step, and the fixed verify width."""
    if config.strategy == "speculative":
        return (1, config.value("num_draft") + 1)
    if config.strategy == "lookahead":
        return (1, config.value("lookahead_size") + 1)
    return (1,)


def _max_new(net, config: GenerationConfig, ids: torch.Tensor, prefix_len: int) -> int:
    used = prefix_len + ids.shape[1]
    room = net.config.max_seq_len - used
    if config.max_new_tokens is None:
        if room < 1:
            raise ValueError(f"prefix {prefix_len} + prompt {ids.shape[1]} leave no room under max_seq_len={net.config.max_seq_len}")
        return room
    if config.max_new_tokens > room:
        raise ValueError(f"prefix {prefix_len} + prompt {ids.shape[1]} + max_new_tokens={config.max_new_tokens} "
                         f"exceeds max_seq_len={net.config.max_seq_len}")
    return config.max_new_tokens


def _repeat(out: GenerationOutput, n: int) -> GenerationOutput:
    if n == 1:
        return out
    return GenerationOutput(out.ids.repeat_interleave(n, 0), out.lengths.repeat_interleave(n, 0),
                            out.finished.repeat_interleave(n, 0), out.stats)


class Rows:
    """The growing output of a decode call: ids, per-row lengths and EOS bookkeeping."""

    def __init__(self, ids: torch.Tensor, tokens: Tokens, stream: StreamFn | None = None) -> None:
        self.seq = ids
        self.tokens, self.stream = tokens, stream
        b = ids.shape[0]
        self.finished = torch.zeros(b, dtype=torch.bool, device=ids.device)
        self.lengths = torch.full((b,), ids.shape[1], dtype=torch.long, device=ids.device)
        self.steps = 0

    def append(self, tok: torch.Tensor) -> None:
        """Append one token per row [B]; rows already finished get the pad id."""
        eos = self.tokens.eos_id
        tok = torch.where(self.finished, torch.full_like(tok, self.tokens.pad_id), tok)
        self.seq = torch.cat([self.seq, tok[:, None]], 1)
        self.lengths.add_((~self.finished).long())
        if eos is not None:
            self.finished = self.finished | (tok == eos)
        if self.stream is not None:
            self.stream(self.steps, tok)
        self.steps += 1

    @property
    def done(self) -> bool:
        """All rows ended on EOS (no device sync without an EOS id)."""
        return self.tokens.eos_id is not None and bool(self.finished.all())

    def output(self, stats: dict | None = None) -> GenerationOutput:
        return GenerationOutput(self.seq, self.lengths, self.finished, stats or {})
