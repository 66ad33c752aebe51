"""``lookahead``: exact parallel decoding without a draft model.

Each round guesses the next ``lookahead_size`` tokens, scores them with the target
in one forward (the shared propose-and-verify round of :mod:`.speculative`, with
point-mass proposals) and keeps the longest verified prefix plus one target token.
Greedy output is the target's greedy output; sampled output is exactly distributed
(a guess x is kept with probability p(x), else a token is drawn from p without x).

Guesses come from

* the sequence itself: the tokens that followed the most recent earlier occurrence
  of its last 3 (else 2, else 1) tokens -- lookahead decoding's n-gram pool (Fu et
  al. 2024) restricted to the text so far, as in prompt-lookup decoding; repeats in
  music (held notes, repeated bars) make these guesses good;
* the Jacobi iterates: the target's own argmax predictions for the positions after
  the accepted ones in the previous round (Santilli et al. 2023), where no n-gram
  matches.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from armodal.generation.engine import Engine, GenerationOutput
from armodal.generation.speculative import verify_loop

__all__ = ["NgramProposer", "decode"]


class NgramProposer:
    """Guesses from an n-gram index over each row's tokens, then from the last round's Jacobi iterates."""

    def __init__(self, orders: tuple[int, ...] = (3, 2, 1)) -> None:
        self.orders = orders

    def caches(self, batch: int, length: int):
        return nullcontext()

    def start(self, seq: torch.Tensor) -> None:
        self.toks = [row.tolist() for row in seq.cpu()]
        self.index = [{o: {} for o in self.orders} for _ in self.toks]
        self.indexed = [0] * len(self.toks)
        self.jacobi: list[list[int]] | None = None

    def _sync(self, seq: torch.Tensor) -> None:
        n = len(self.toks[0])
        if seq.shape[1] > n:
            for r, new in enumerate(seq[:, n:].tolist()):
                self.toks[r].extend(new)
        for r, toks in enumerate(self.toks):  # index the n-grams ending before the last token
            idx = self.index[r]
            for end in range(self.indexed[r], len(toks) - 1):
                for o in self.orders:
                    if end + 1 >= o:
                        idx[o][tuple(toks[end + 1 - o : end + 1])] = end
            self.indexed[r] = max(len(toks) - 1, 0)

    def propose(self, seq: torch.Tensor, k: int) -> tuple[torch.Tensor, None]:
        self._sync(seq)
        out = []
        for r, toks in enumerate(self.toks):
            guess: list[int] = []
            for o in self.orders:
                end = self.index[r][o].get(tuple(toks[-o:])) if len(toks) >= o else None
                if end is not None:
                    guess = toks[end + 1 : end + 1 + k]
                    break
            if self.jacobi is not None:
                guess += self.jacobi[r][len(guess) : k]
            fill = guess[-1] if guess else toks[-1]
            out.append(guess + [fill] * (k - len(guess)))
        return torch.tensor(out, dtype=torch.long, device=seq.device), None

    def observe(self, seq: torch.Tensor, t: int, k: int, matched: int, logits: torch.Tensor) -> None:
        # logits[:, i] predicted token t + i; the next round guesses from token seq.shape[1] on
        self.jacobi = logits[:, seq.shape[1] - t :].argmax(-1).tolist()


@torch.no_grad()
def decode(
    engine: Engine,
    ids: torch.Tensor,
    *,
    max_new: int,
    num_return: int = 1,
    generator: torch.Generator | None = None,
    stream=None,
) -> GenerationOutput:
    return verify_loop(engine, NgramProposer(), engine.expand(num_return, ids), k=engine.config.value("lookahead_size"),
                       max_new=max_new, generator=generator, stream=stream)
