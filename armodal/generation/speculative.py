"""``speculative``: a small draft proposes, the target verifies several tokens per forward.

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).  Each round the
proposer offers k tokens; the target scores the last committed token and the k
proposals in one forward; proposal i is kept with probability ``min(1, p_i(x) /
q_i(x))`` and at the first rejection a token is drawn from ``norm(max(0, p_i -
q_i))`` (if all are kept, one more is drawn from ``p_k``).  The tokens are
distributed exactly as the target's under the same :class:`GenerationConfig`; with
greedy settings they are the target's greedy tokens.

The round (:func:`verify_loop`) is shared with :mod:`.lookahead`, whose proposals
are guesses with a point-mass ``q``.  Rows of a batch advance together: every row
keeps the same number of tokens per round (the smallest number any unfinished row
verified), which leaves each row's tokens exactly distributed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch

from armodal.generation.config import GenerationConfig
from armodal.generation.engine import Engine, GenerationOutput, Rows, Tokens, weights_for
from armodal.generation.processors import probs, sample

__all__ = ["Draft", "DraftProposer", "accept", "as_draft", "decode", "verify_loop"]


@dataclass
class Draft:
    """A draft network and its own prefixes (a draft with a conditioner encodes ``cond`` itself)."""

    net: torch.nn.Module
    prefix: torch.Tensor | None = None
    uncond_prefix: torch.Tensor | None = None


class Proposer(Protocol):
    def caches(self, batch: int, length: int): ...
    def start(self, seq: torch.Tensor) -> None: ...
    def propose(self, seq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]: ...
    def observe(self, seq: torch.Tensor, t: int, k: int, matched: int, logits: torch.Tensor) -> None: ...


def as_draft(draft, target_net, config: GenerationConfig, tokens: Tokens, device) -> Draft:
    d = draft if isinstance(draft, Draft) else Draft(draft)
    d = Draft(weights_for(d.net, config), d.prefix, d.uncond_prefix)  # quantize= applies to the draft too
    if d.net is target_net:  # the same module cannot hold two sets of caches
        d = Draft(copy.deepcopy(target_net), d.prefix, d.uncond_prefix)
    if d.net.config.vocab_size != target_net.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({d.net.config.vocab_size}) differs from the target's "
                         f"({target_net.config.vocab_size}): a draft must share the tokenizer")
    if next(d.net.parameters()).device != device:
        raise ValueError("the draft and the target must be on the same device")
    return d


class DraftProposer:
    """Proposals sampled from a draft network run by its own engine."""

    def __init__(self, engine: Engine, generator: torch.Generator | None) -> None:
        self.engine, self.generator = engine, generator
        self.valid = 0  # leading tokens whose keys/values in the draft cache are right
        self.fed = 0

    def caches(self, batch: int, length: int):
        return self.engine.caches(batch, length)

    def start(self, seq: torch.Tensor) -> None:
        if seq.shape[1] > 1 or self.engine.prefix is not None:
            self.engine.prefill(seq[:, :-1])
        else:
            self.engine.batch_rows = seq.shape[0]
        self.valid = seq.shape[1] - 1

    def propose(self, seq: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        eng, cfg = self.engine, self.engine.config
        logits = eng.forward(seq, self.valid)[:, -1]
        ext, xs, qs = seq, [], []
        for i in range(k):
            processed = eng.process(logits, ext)
            qs.append(probs(processed, cfg))
            xs.append(sample(processed, cfg, self.generator))
            ext = torch.cat([ext, xs[-1][:, None]], 1)
            if i < k - 1:
                logits = eng.forward(ext, ext.shape[1] - 1)[:, -1]
        self.fed = seq.shape[1] + k - 1
        return torch.stack(xs, 1), torch.stack(qs, 1)

    def observe(self, seq: torch.Tensor, t: int, k: int, matched: int, logits: torch.Tensor) -> None:
        # keep at least the newest token to feed next round
        self.valid = min(self.fed, t + matched, seq.shape[1] - 1)


def accept(
    ps: torch.Tensor,  # [B, k + 1, V] target distributions (one-hot when greedy)
    qs: torch.Tensor | None,  # [B, k, V] draft distributions; None = point masses on xs
    xs: torch.Tensor,  # [B, k] proposals
    greedy: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The accept/reject step for every row: (tokens [B, k + 1], accepted proposals per row [B]).

    Row r's tokens are ``xs[r, :n_r]`` followed by one target token at index ``n_r``
    (drawn from the residual at the first rejection, or from ``p_k`` when all were kept);
    entries after that are meaningless.
    """
    b, k = xs.shape
    rows = torch.arange(b, device=xs.device)
    if k:
        px = ps[:, :k].gather(-1, xs[..., None]).squeeze(-1)  # [B, k]
        if greedy:
            ok = px > 0
        else:
            qx = torch.ones_like(px) if qs is None else qs.gather(-1, xs[..., None]).squeeze(-1)
            u = torch.rand(px.shape, generator=generator, device=px.device)
            ok = (qx > 0) & (u * qx < px)
        n_acc = ok.long().cumprod(1).sum(1)  # leading accepted proposals
    else:
        n_acc = torch.zeros(b, dtype=torch.long, device=xs.device)
    p_next = ps[rows, n_acc]  # [B, V]
    if greedy:
        extra = p_next.argmax(-1)
    else:
        q_next = torch.zeros_like(p_next)
        rejected = n_acc < k
        if k and rejected.any():
            j = n_acc.clamp(max=k - 1)
            if qs is None:
                q_next[rows, xs[rows, j]] = 1.0
            else:
                q_next = qs[rows, j]
            q_next = q_next * rejected[:, None]
        resid = (p_next - q_next).clamp_min(0)
        mass = resid.sum(-1, keepdim=True)
        resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_next)
        extra = torch.multinomial(resid, 1, generator=generator).squeeze(-1)
    out = torch.cat([xs, torch.zeros(b, 1, dtype=xs.dtype, device=xs.device)], 1)
    out[rows, n_acc] = extra
    return out, n_acc


@torch.no_grad()
def verify_loop(
    target: Engine,
    proposer: Proposer,
    ids: torch.Tensor,  # [B, T]
    *,
    k: int,
    max_new: int,
    generator: torch.Generator | None = None,
    stream=None,
) -> GenerationOutput:
    """Propose-and-verify rounds until ``max_new`` tokens (or EOS in every row).  ``stats``:
    proposals made and accepted, the acceptance rate, target forwards and tokens per target forward."""
    cfg, tokens = target.config, target.tokens
    greedy = cfg.is_greedy
    rows = Rows(ids, tokens, stream)
    b, t0 = ids.shape
    total = target.prefix_len + t0 + max_new
    proposed = accepted = forwards = 0
    with target.caches(b, total), proposer.caches(b, total):
        if t0 == 0:  # nothing to verify against yet: the first token comes from the prefix alone
            rows.append(target.choose(target.prefill(ids), rows.seq, generator))
            forwards += 1
        elif t0 > 1 or target.prefix is not None:
            target.prefill(ids[:, :-1])
        else:
            target.batch_rows = b
        proposer.start(rows.seq)
        new = rows.seq.shape[1] - t0
        while new < max_new and not rows.done:
            seq = rows.seq
            t = seq.shape[1]
            kk = min(k, max_new - new - 1)
            if kk:
                xs, qs = proposer.propose(seq, kk)
            else:
                xs, qs = seq.new_zeros(b, 0), None
            ext = torch.cat([seq, xs], 1)
            logits = target.forward(ext, t - 1)  # [B, kk + 1, V]: index i predicts token t + i
            forwards += 1
            ps = torch.stack([probs(target.process(logits[:, i], ext[:, : t + i]), cfg) for i in range(kk + 1)], 1)
            out, n_acc = accept(ps, qs, xs, greedy, generator)
            counts = n_acc + 1
            if tokens.eos_id is not None:  # a row's tokens end at its first EOS
                is_eos = (out == tokens.eos_id) & (torch.arange(kk + 1, device=out.device) < counts[:, None])
                counts = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, counts)
            live = ~rows.finished
            m = int(counts[live].min()) if bool(live.any()) else 1
            m = min(m, max_new - new)
            for j in range(m):  # ps[:, j] is token t + j's distribution given the kept tokens (j <= n_acc)
                if target.on_probs is not None:
                    target.on_probs(rows.seq, ps[:, j])
                rows.append(out[:, j])
            proposed += kk * int(live.sum())
            accepted += int(n_acc[live].clamp(max=kk).sum())
            matched = min(m, int(n_acc[live].min()) if bool(live.any()) else 0)
            if kk:
                proposer.observe(rows.seq, t, kk, matched, logits)
            new += m
    stats = {
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "target_forwards": forwards,
        "tokens_per_target_forward": new / max(forwards, 1),
    }
    return rows.output(stats)


@torch.no_grad()
def decode(
    engine: Engine,
    draft: Draft,
    ids: torch.Tensor,
    *,
    max_new: int,
    num_return: int = 1,
    generator: torch.Generator | None = None,
    stream=None,
) -> GenerationOutput:
    from armodal.generation.fast import decoder_for, use_compile

    ids = engine.expand(num_return, ids)
    cfg = engine.config
    dec = decoder_for(draft.net) if use_compile(cfg, ids.device, "speculative") else None
    draft_engine = Engine(draft.net, cfg, engine.tokens, prefix=draft.prefix, uncond_prefix=draft.uncond_prefix,
                          decoder=dec, compiled_widths=(1,))
    draft_engine.expand(num_return)
    return verify_loop(engine, DraftProposer(draft_engine, generator), ids, k=cfg.value("num_draft"),
                       max_new=max_new, generator=generator, stream=stream)

