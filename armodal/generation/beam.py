"""``beam``: keep the ``num_beams`` best partial sequences per prompt.

Hypotheses are scored by the log-probabilities of the processed distribution (the
grammar mask, repetition penalty, temperature and top-k/p/min-p filters of the
config apply as in sampling) and ranked by ``sum log p / gen_len ** length_penalty``.
The beams of all prompts (and their unconditional twins under guidance) run as rows
of one engine batch; the caches are reordered after each step.
"""

from __future__ import annotations

import heapq

import torch

from armodal.generation.engine import Engine, GenerationOutput

__all__ = ["beam_search"]


@torch.no_grad()
def beam_search(
    engine: Engine,
    ids: torch.Tensor,  # [B, T]
    *,
    max_new: int,
    num_return: int = 1,
    generator: torch.Generator | None = None,  # unused: beam search is deterministic
    stream=None,
) -> GenerationOutput:
    """The ``num_return`` best hypotheses of every prompt (``stats['scores']``: their scores)."""
    cfg = engine.config
    k = cfg.value("num_beams")
    length_penalty, early = cfg.value("length_penalty"), cfg.value("early_stopping")
    if num_return > k:
        raise ValueError(f"strategy=beam returns at most num_beams={k} hypotheses per prompt, {num_return} were asked for")
    if stream is not None:
        raise ValueError("strategy=beam cannot stream: the hypotheses change until the search ends")
    eos_id, pad_id = engine.tokens.eos_id, engine.tokens.pad_id
    b, t0 = ids.shape
    dev = ids.device
    seq = engine.expand(k, ids)  # [B*K, T]
    scores = torch.full((b, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    done: list[list[tuple[float, int, torch.Tensor]]] = [[] for _ in range(b)]  # min-heaps of finished ones
    counter = 0

    def norm(score: float, gen_len: int) -> float:
        return score / (max(gen_len, 1) ** length_penalty)

    with engine.caches(b * k, engine.prefix_len + t0 + max_new):
        logits = engine.prefill(seq)  # [B*K, V]
        for step in range(max_new):
            logp = engine.process(logits, seq).log_softmax(-1)  # [B*K, V]
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
            engine.reorder(flat)
            if step == max_new - 1 or all(_finished(done[bi], scores[bi], k, early, norm(scores[bi].max().item(), step + 1))
                                          for bi in range(b)):
                break
            logits = engine.forward(seq, seq.shape[1] - 1)[:, -1]
    gen_len = seq.shape[1] - t0
    best, best_scores = [], []
    for bi in range(b):
        pool = list(done[bi])
        for j in range(k):
            s = scores[bi, j].item()
            if s > float("-inf"):
                counter += 1
                pool.append((norm(s, gen_len), counter, seq[bi * k + j]))
        pool.sort(key=lambda x: -x[0])
        if len(pool) < num_return:
            raise RuntimeError(f"beam search kept {len(pool)} hypotheses for prompt {bi}, fewer than {num_return}")
        for sc, _, hyp in pool[:num_return]:
            best.append(hyp)
            best_scores.append(sc)
    width = max(h.shape[0] for h in best)
    out = torch.full((len(best), width), pad_id, dtype=torch.long, device=dev)
    for r, h in enumerate(best):
        out[r, : h.shape[0]] = h
    lengths = torch.tensor([h.shape[0] for h in best], device=dev)
    finished = torch.tensor([eos_id is not None and h[-1].item() == eos_id for h in best], device=dev)
    return GenerationOutput(out, lengths, finished, {"scores": best_scores})


def _finished(done: list, live: torch.Tensor, k: int, early: bool, best_live: float) -> bool:
    """Whether a prompt's search is over: num_beams ended hypotheses, and (unless ``early``) none of the
    live beams beats the worst of them at the current length."""
    if not torch.isfinite(live).any():
        return True
    if len(done) < k:
        return False
    return early or done[0][0] >= best_live
