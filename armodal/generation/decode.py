"""Cached decode loops: prefill once, then one token at a time.

The model only knows caches (``setup_caches`` / ``clear_caches`` / ``input_pos``);
everything about choosing tokens lives here and in :mod:`.processors`.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Callable

import torch

from armodal.generation.processors import SamplingParams, cfg_mix, probs, process, sample

__all__ = ["GenerationOutput", "generate", "beam_search", "speculative_generate"]

TypesFn = Callable[[torch.Tensor], "torch.Tensor | None"]  # ids [B, t] -> types [B, t]
AllowedFn = Callable[[torch.Tensor], "torch.Tensor | None"]  # ids [B, t] -> bool [B, V]
StreamFn = Callable[[int, torch.Tensor], None]  # (step, new ids [B]) -> None


@dataclass
class GenerationOutput:
    ids: torch.Tensor  # [B, T + N] prompt then generated ids (pad after EOS)
    lengths: torch.Tensor  # [B] number of valid ids per row (prompt + generated, EOS included)
    finished: torch.Tensor  # [B] bool: stopped on EOS
    stats: dict = field(default_factory=dict)


def _empty_ids(batch: int, device) -> torch.Tensor:
    return torch.zeros(batch, 0, dtype=torch.long, device=device)


def _types(types_fn: TypesFn | None, ids: torch.Tensor) -> torch.Tensor | None:
    return None if types_fn is None else types_fn(ids)


class _Caches:
    """Set up caches for a decode call and restore the model afterwards.

    A model whose caches were made persistent (``model.persistent_caches = (batch, length)``,
    set by :class:`armodal.generation.fast.FastDecoder`) keeps them when they are large
    enough: the same static buffers serve every call, which compiled / CUDA-graph decode
    steps need.  Stale slots are harmless: they lie after the current position (masked)
    and are overwritten before they are read.
    """

    def __init__(self, model, batch: int, length: int) -> None:
        self.model, self.batch, self.length = model, batch, length
        self.reuse = False

    def __enter__(self):
        keep = getattr(self.model, "persistent_caches", None)
        self.reuse = (
            keep is not None and self.model.has_caches and self.batch <= keep[0] and self.length <= keep[1]
        )
        if not self.reuse:
            self.model.setup_caches(self.batch, self.length)
        return self.model

    def __exit__(self, *exc) -> None:
        if not self.reuse:
            self.model.clear_caches()


def _check_inputs(model, ids, prefix):
    if ids is None and prefix is None:
        raise ValueError("generate needs prompt ids, a prefix, or both")
    device = next(model.parameters()).device
    if ids is None:
        ids = _empty_ids(prefix.shape[0], device)
    if ids.dim() != 2:
        raise ValueError(f"prompt ids must be [B, T], got shape {tuple(ids.shape)}")
    return ids.to(device), (None if prefix is None else prefix.to(device))


@torch.no_grad()
def generate(
    model,
    ids: torch.Tensor | None = None,  # [B, T] prompt (may be empty when a prefix is given)
    *,
    max_new_tokens: int,
    prefix: torch.Tensor | None = None,  # [B, P, D]
    uncond_prefix: torch.Tensor | None = None,  # [B, P, D], for classifier-free guidance
    cfg_scale: float = 1.0,
    sampling: SamplingParams = SamplingParams(),
    eos_id: int | None = None,
    pad_id: int = 0,
    types_fn: TypesFn | None = None,
    allowed_fn: AllowedFn | None = None,
    stream: StreamFn | None = None,
    generator: torch.Generator | None = None,
    num_return_sequences: int = 1,
    use_cache: bool = True,
    step_fn: Callable | None = None,
) -> GenerationOutput:
    """Autoregressive sampling with per-row EOS stopping.

    ``num_return_sequences`` samples that many continuations of every prompt in one
    batch.  ``use_cache=False`` recomputes the whole prefix each step (reference
    path).  ``step_fn`` replaces the single-token cached forward (e.g. a compiled
    one); it is called as ``step_fn(model, tok [B,1], types [B,1] | None, input_pos [1])``.
    """
    ids, prefix = _check_inputs(model, ids, prefix)
    if num_return_sequences > 1:
        ids = ids.repeat_interleave(num_return_sequences, 0)
        prefix = None if prefix is None else prefix.repeat_interleave(num_return_sequences, 0)
        if uncond_prefix is not None:
            uncond_prefix = uncond_prefix.repeat_interleave(num_return_sequences, 0)
    b, t0 = ids.shape
    p = 0 if prefix is None else prefix.shape[1]
    use_cfg = uncond_prefix is not None and cfg_scale != 1.0
    if use_cfg and prefix is None:
        raise ValueError("classifier-free guidance needs a conditional prefix and an unconditional one")
    rows = 2 * b if use_cfg else b
    total = p + t0 + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prefix {p} + prompt {t0} + {max_new_tokens} new tokens exceeds max_seq_len={model.config.max_seq_len}")

    def dup(x):
        return None if x is None else (torch.cat([x, x], 0) if use_cfg else x)

    def mix(logits):  # [rows, V] -> [B, V]
        return cfg_mix(logits[:b], logits[b:], cfg_scale) if use_cfg else logits

    full_prefix = torch.cat([prefix, uncond_prefix.to(prefix)], 0) if use_cfg else prefix
    seq = ids
    finished = torch.zeros(b, dtype=torch.bool, device=ids.device)
    lengths = torch.full((b,), t0, dtype=torch.long, device=ids.device)

    def choose(logits):
        prev = seq if sampling.repetition_penalty != 1.0 else None
        allowed = allowed_fn(seq) if allowed_fn is not None else None
        return sample(process(logits, sampling, prev, allowed), sampling, generator)

    def append(tok, step):
        nonlocal seq, finished
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        seq = torch.cat([seq, tok[:, None]], 1)
        lengths.add_((~finished).long())
        if eos_id is not None:
            finished = finished | (tok == eos_id)
        if stream is not None:
            stream(step, tok)

    if not use_cache:
        for step in range(max_new_tokens):
            logits = model(dup(seq), prefix=full_prefix, types=dup(_types(types_fn, seq)))[:, -1]
            append(choose(mix(logits)), step)
            if finished.all():
                break
        return GenerationOutput(seq, lengths, finished)

    with _Caches(model, rows, total):
        s0 = p + t0
        logits = model(
            dup(seq) if t0 else None,
            prefix=full_prefix,
            types=dup(_types(types_fn, seq)) if t0 else None,
            input_pos=torch.arange(s0, device=ids.device),
            kv_len=s0,
            num_logits=1,
        )[:, -1]
        for step in range(max_new_tokens):
            append(choose(mix(logits)), step)
            if step == max_new_tokens - 1 or (eos_id is not None and finished.all()):  # no sync without EOS
                break
            pos = s0 + step
            tok = dup(seq[:, -1:])
            typ = _types(types_fn, seq)
            typ = None if typ is None else dup(typ[:, -1:])
            input_pos = torch.tensor([pos], device=ids.device)
            if step_fn is not None:
                logits = step_fn(model, tok, typ, input_pos)[:, -1]
            else:
                logits = model(tok, types=typ, input_pos=input_pos, kv_len=pos + 1)[:, -1]
    return GenerationOutput(seq, lengths, finished)


# ----------------------------------------------------------------------------- beam search
@torch.no_grad()
def beam_search(
    model,
    ids: torch.Tensor | None = None,  # [B, T]
    *,
    beam_size: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    prefix: torch.Tensor | None = None,
    types_fn: TypesFn | None = None,
    allowed_fn: AllowedFn | None = None,
) -> GenerationOutput:
    """Beam search ranking finished hypotheses by ``sum log p / gen_len ** length_penalty``.

    Returns the best hypothesis per prompt; ``stats['scores']`` holds its score.
    """
    ids, prefix = _check_inputs(model, ids, prefix)
    b, t0 = ids.shape
    k = beam_size
    p = 0 if prefix is None else prefix.shape[1]
    s0 = p + t0
    dev = ids.device
    seq = ids.repeat_interleave(k, 0)  # [B*K, T]
    pre = None if prefix is None else prefix.repeat_interleave(k, 0)
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    done: list[list[tuple[float, int, torch.Tensor]]] = [[] for _ in range(b)]
    counter = 0

    def norm(score: float, gen_len: int) -> float:
        return score / (max(gen_len, 1) ** length_penalty)

    with _Caches(model, b * k, s0 + max_new_tokens):
        logits = model(
            seq if t0 else None, prefix=pre, types=_types(types_fn, seq) if t0 else None,
            input_pos=torch.arange(s0, device=dev), kv_len=s0, num_logits=1,
        )[:, -1]
        for step in range(max_new_tokens):
            allowed = allowed_fn(seq) if allowed_fn is not None else None
            logp = process(logits, SamplingParams(greedy=True), None, allowed).log_softmax(-1)  # [B*K, V]
            v = logp.shape[-1]
            cand = (scores[:, :, None] + logp.view(b, k, v)).view(b, k * v)
            top_s, top_i = cand.topk(min(2 * k, k * v), dim=-1)  # spare candidates replace EOS ones
            new_scores = torch.full((b, k), float("-inf"), device=dev)
            src = torch.zeros(b, k, dtype=torch.long, device=dev)
            toks = torch.full((b, k), pad_id, dtype=torch.long, device=dev)
            for bi in range(b):
                j = 0
                for s, i in zip(top_s[bi].tolist(), top_i[bi].tolist()):
                    if s == float("-inf") or j == k:
                        break
                    beam, tok = divmod(i, v)
                    if eos_id is not None and tok == eos_id:
                        hyp = torch.cat([seq[bi * k + beam], torch.tensor([tok], device=dev)])
                        counter += 1
                        heapq.heappush(done[bi], (norm(s, step + 1), counter, hyp))
                        if len(done[bi]) > k:
                            heapq.heappop(done[bi])
                        continue
                    new_scores[bi, j], src[bi, j], toks[bi, j] = s, beam, tok
                    j += 1
            flat = (src + torch.arange(b, device=dev)[:, None] * k).view(-1)
            seq = torch.cat([seq[flat], toks.view(-1, 1)], 1)
            scores = new_scores
            model.reorder_caches(flat)
            all_done = all(
                len(done[bi]) >= k and done[bi][0][0] >= norm(scores[bi].max().item(), step + 1)
                for bi in range(b)
            )
            if all_done or step == max_new_tokens - 1:
                break
            pos = s0 + step
            typ = _types(types_fn, seq)
            logits = model(
                seq[:, -1:], types=None if typ is None else typ[:, -1:],
                input_pos=torch.tensor([pos], device=dev), kv_len=pos + 1,
            )[:, -1]
    gen_len = seq.shape[1] - t0
    best, best_scores, finished = [], [], []
    for bi in range(b):
        pool = list(done[bi])
        for j in range(k):
            s = scores[bi, j].item()
            if s > float("-inf"):
                counter += 1
                pool.append((norm(s, gen_len), counter, seq[bi * k + j]))
        sc, _, hyp = max(pool, key=lambda x: x[0])
        best.append(hyp)
        best_scores.append(sc)
        finished.append(eos_id is not None and hyp[-1].item() == eos_id)
    width = max(h.shape[0] for h in best)
    out = torch.full((b, width), pad_id, dtype=torch.long, device=dev)
    for bi, h in enumerate(best):
        out[bi, : h.shape[0]] = h
    lengths = torch.tensor([h.shape[0] for h in best], device=dev)
    return GenerationOutput(out, lengths, torch.tensor(finished, device=dev), {"scores": best_scores})


# ----------------------------------------------------------------------------- speculative
def verify_draft(
    ps: list[torch.Tensor],  # k + 1 target distributions [V]
    qs: list[torch.Tensor],  # k draft distributions [V]
    xs: list[int],  # k draft proposals
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """The speculative accept/reject step: returns the accepted proposals plus one target token.

    Proposal i is kept with prob ``min(1, p_i(x)/q_i(x))``; at the first rejection a token is drawn
    from ``norm(max(0, p_i - q_i))`` and the step ends; if all are kept, one more is drawn from p_k.
    """
    dev = "cpu" if generator is None else generator.device
    out: list[int] = []
    for i, x in enumerate(xs):
        px, qx = ps[i][x].item(), qs[i][x].item()
        if qx > 0 and torch.rand((), generator=generator, device=dev).item() < min(1.0, px / qx):
            out.append(x)
            if eos_id is not None and x == eos_id:
                return out
            continue
        resid = (ps[i] - qs[i]).clamp_min(0)
        resid = resid / resid.sum() if resid.sum() > 0 else ps[i]
        out.append(torch.multinomial(resid, 1, generator=generator).item())
        return out
    out.append(torch.multinomial(ps[len(xs)], 1, generator=generator).item())
    return out


@torch.no_grad()
def speculative_generate(
    target,
    draft,
    ids: torch.Tensor,  # [1, T], T >= 1
    *,
    max_new_tokens: int,
    num_draft: int = 4,
    sampling: SamplingParams = SamplingParams(),
    eos_id: int | None = None,
    types_fn: TypesFn | None = None,
    allowed_fn: AllowedFn | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batch 1.

    The draft proposes ``num_draft`` tokens; the target scores them in one forward
    and accepts each with prob ``min(1, p/q)``; on rejection it samples from
    ``norm(max(0, p - q))``.  The output distribution equals the target's under the
    same :class:`SamplingParams`.  ``stats`` reports the acceptance rate.
    """
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError("speculative_generate takes one prompt of shape [1, T] with T >= 1")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError("draft and target must share the vocabulary")
    dev = next(target.parameters()).device
    seq = ids.to(dev)
    total = seq.shape[1] + max_new_tokens + num_draft + 1
    proposed = accepted = target_calls = 0

    def dist(logits, prefix_ids):
        allowed = allowed_fn(prefix_ids) if allowed_fn is not None else None
        prev = prefix_ids if sampling.repetition_penalty != 1.0 else None
        return probs(process(logits, sampling, prev, allowed), sampling)[0]  # [V]

    def fwd(model, toks, start):
        typ = _types(types_fn, seq_ext[:, : start + toks.shape[1]])
        typ = None if typ is None else typ[:, start:]
        pos = torch.arange(start, start + toks.shape[1], device=dev)
        return model(toks, types=typ, input_pos=pos, kv_len=start + toks.shape[1])

    with _Caches(target, 1, total), _Caches(draft, 1, total):
        n = seq.shape[1]
        seq_ext = seq
        if n > 1:
            fwd(target, seq[:, :-1], 0)
            fwd(draft, seq[:, :-1], 0)
        new = 0
        while new < max_new_tokens:
            k = min(num_draft, max_new_tokens - new - 1)
            n = seq.shape[1]
            # draft proposes k tokens
            seq_ext = seq
            qs, xs = [], []
            for i in range(k):
                q = dist(fwd(draft, seq_ext[:, -1:], n - 1 + i)[:, -1], seq_ext)
                x = torch.multinomial(q, 1, generator=generator) if not sampling.is_greedy else q.argmax()[None]
                qs.append(q)
                xs.append(x.item())
                seq_ext = torch.cat([seq_ext, x.view(1, 1)], 1)
            # target scores the last known token plus the k proposals in one forward
            logits = fwd(target, seq_ext[:, n - 1 :], n - 1)[0]  # [k + 1, V]
            target_calls += 1
            ps = [dist(logits[i : i + 1], seq_ext[:, : n + i]) for i in range(k + 1)]
            out = verify_draft(ps, qs, xs, generator, eos_id)
            n_acc = next((i for i, (a, b) in enumerate(zip(out, xs)) if a != b), min(len(out), k))
            accepted += n_acc
            proposed += k
            if n_acc == k and len(out) == k + 1 and k > 0:  # all accepted: the draft never saw its last proposal
                fwd(draft, seq_ext[:, -1:], n - 1 + k)
            if eos_id is not None and eos_id in out:
                out = out[: out.index(eos_id) + 1]
            out = out[: max_new_tokens - new]
            seq = torch.cat([seq, torch.tensor([out], device=dev)], 1)
            seq_ext = seq
            new += len(out)
            if eos_id is not None and out[-1] == eos_id:
                break
    finished = torch.tensor([eos_id is not None and seq[0, -1].item() == eos_id], device=dev)
    stats = {
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "target_forwards": target_calls,
        "tokens_per_target_forward": new / max(target_calls, 1),
    }
    return GenerationOutput(seq, torch.tensor([seq.shape[1]], device=dev), finished, stats)
