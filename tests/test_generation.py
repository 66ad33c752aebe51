"""Decoding engine: processors on hand-made logits, greedy, beam, speculative, CFG, control."""

import itertools
import math

import pytest
import torch

from armodal.generation import (
    SamplingParams,
    beam_search,
    cfg_mix,
    generate,
    mask_disallowed,
    min_p,
    process,
    repetition_penalty,
    speculative_generate,
    top_k,
    top_p,
)
from armodal.models import build_transformer

INF = float("-inf")


def model(seed=0, vocab=30, **kw):
    torch.manual_seed(seed)
    args = dict(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=96)
    args.update(kw)
    return build_transformer(**args).eval()


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


# ----------------------------------------------------------------------------- processors
LOGITS = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))


def test_top_k_keeps_k_largest():
    assert kept(top_k(LOGITS, 2)) == {1, 3}
    assert kept(top_k(LOGITS, 0)) == {0, 1, 2, 3, 4}


def test_top_p_keeps_smallest_nucleus():
    assert kept(top_p(LOGITS, 0.5)) == {1, 3}  # 0.4 < 0.5, 0.4 + 0.3 >= 0.5
    assert kept(top_p(LOGITS, 0.7)) == {1, 3}  # exactly reaches 0.7
    assert kept(top_p(LOGITS, 0.71)) == {1, 3, 4}
    assert kept(top_p(LOGITS, 0.01)) == {1}


def test_min_p_relative_to_top():
    assert kept(min_p(LOGITS, 0.5)) == {1, 3}  # threshold 0.2
    assert kept(min_p(LOGITS, 0.3)) == {1, 3, 4}  # threshold 0.12


def test_repetition_penalty_ctrl_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert logits[0, 0] == 2.0  # pure: input untouched


def test_allowed_mask_keeps_exactly_the_allowed_set():
    allowed = torch.tensor([[False, True, False, False, True]])
    assert kept(mask_disallowed(LOGITS, allowed)) == {1, 4}
    assert kept(mask_disallowed(LOGITS, torch.zeros(1, 5, dtype=torch.bool))) == {0, 1, 2, 3, 4}


def test_process_composes_in_order():
    p = SamplingParams(temperature=0.5, top_k=3, top_p=0.8)
    out = process(LOGITS, p, allowed=torch.tensor([[True, False, True, True, True]]))
    assert kept(out) == {3, 4}  # mask drops 1; T=0.5 gives {3: .72, 4: .18, 2: .08}; top-3; p=0.8 keeps {3, 4}


def test_cfg_scale_endpoints():
    c, u = torch.randn(2, 7), torch.randn(2, 7)
    torch.testing.assert_close(cfg_mix(c, u, 0.0), u)
    torch.testing.assert_close(cfg_mix(c, u, 1.0), c)
    torch.testing.assert_close(cfg_mix(c, u, 3.0), u + 3 * (c - u))


# ----------------------------------------------------------------------------- decode loop
def test_greedy_matches_argmax_loop():
    m = model()
    ids = torch.randint(0, 30, (2, 5))
    out = generate(m, ids, max_new_tokens=12, sampling=SamplingParams(greedy=True))
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.ids, seq)
    nocache = generate(m, ids, max_new_tokens=12, sampling=SamplingParams(greedy=True), use_cache=False)
    assert torch.equal(nocache.ids, seq)


def test_eos_stops_each_row_and_pads():
    m = model()
    ids = torch.randint(0, 30, (4, 3))
    ref = generate(m, ids, max_new_tokens=10, sampling=SamplingParams(greedy=True))
    eos = ref.ids[0, 5].item()  # the token row 0 emits at its 3rd step
    out = generate(m, ids, max_new_tokens=10, sampling=SamplingParams(greedy=True), eos_id=eos, pad_id=29)
    for r in range(4):
        gen = ref.ids[r, 3:].tolist()
        stop = gen.index(eos) + 1 if eos in gen else len(gen)
        assert out.lengths[r] == 3 + stop
        assert out.ids[r, 3 : 3 + stop].tolist() == gen[:stop]
        assert (out.ids[r, 3 + stop :] == 29).all()
        assert bool(out.finished[r]) == (eos in gen)


def test_streaming_callback_seeded_determinism_and_parallel_samples():
    m = model()
    seen = []
    kw = dict(max_new_tokens=8, sampling=SamplingParams(temperature=1.0), num_return_sequences=5)
    a = generate(m, torch.tensor([[1, 2]]), generator=torch.Generator().manual_seed(7),
                 stream=lambda step, tok: seen.append(tok.clone()), **kw)
    b = generate(m, torch.tensor([[1, 2]]), generator=torch.Generator().manual_seed(7), **kw)
    assert a.ids.shape == (5, 10) and torch.equal(a.ids, b.ids)
    assert torch.equal(torch.stack(seen, 1), a.ids[:, 2:])
    assert len({tuple(r) for r in a.ids.tolist()}) > 1  # 5 continuations differ


def _cfg_reference(m, cond, unc, scale, n):
    """Greedy CFG written out: two separate uncached forwards per step, mixed as u + s (c - u)."""
    seq = torch.zeros(cond.shape[0], 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            ids = seq if seq.shape[1] else None
            c, u = m(ids, prefix=cond)[:, -1], m(ids, prefix=unc)[:, -1]
            seq = torch.cat([seq, (u + scale * (c - u)).argmax(-1, keepdim=True)], 1)
    return seq


def test_prefix_only_generation_and_cfg():
    m = model()
    torch.manual_seed(0)
    cond, unc = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    g = SamplingParams(greedy=True)
    n = 8
    base_u = generate(m, None, max_new_tokens=n, prefix=unc, sampling=g).ids
    base_c = generate(m, None, max_new_tokens=n, prefix=cond, sampling=g).ids
    assert torch.equal(base_u, _cfg_reference(m, cond, unc, 0.0, n))
    assert torch.equal(base_c, _cfg_reference(m, cond, unc, 1.0, n))
    # scale 0 runs the doubled batch: its conditional half must be ignored exactly
    s0 = generate(m, None, max_new_tokens=n, prefix=cond, uncond_prefix=unc, cfg_scale=0.0, sampling=g).ids
    assert torch.equal(s0, base_u)
    for scale in (0.5, 2.5, 4.0):  # the guidance path end to end, cached and uncached
        ref = _cfg_reference(m, cond, unc, scale, n)
        for use_cache in (True, False):
            out = generate(m, None, max_new_tokens=n, prefix=cond, uncond_prefix=unc, cfg_scale=scale, sampling=g,
                           use_cache=use_cache).ids
            assert torch.equal(out, ref), (scale, use_cache)
    guided = _cfg_reference(m, cond, unc, 4.0, n)
    assert not torch.equal(guided, base_c) and not torch.equal(guided, base_u)  # guidance changes the tokens


def test_allowed_fn_constrains_every_step():
    m = model()
    allowed = torch.zeros(30, dtype=torch.bool)
    allowed[[3, 7, 11]] = True
    out = generate(m, torch.tensor([[0]]), max_new_tokens=20, allowed_fn=lambda ids: allowed.expand(ids.shape[0], -1),
                   generator=torch.Generator().manual_seed(0))
    assert set(out.ids[0, 1:].tolist()) <= {3, 7, 11}


# ----------------------------------------------------------------------------- beam search
def test_beam_search_finds_brute_force_optimum():
    m = model(vocab=5, seed=3)
    ids = torch.tensor([[0, 1]])
    n = 3
    with torch.no_grad():
        best, best_seq = -math.inf, None
        for cont in itertools.product(range(5), repeat=n):
            seq = torch.cat([ids, torch.tensor([cont])], 1)
            logp = m(seq).log_softmax(-1)[0]
            score = sum(logp[1 + i, cont[i]].item() for i in range(n))
            if score > best:
                best, best_seq = score, seq
    out = beam_search(m, ids, beam_size=25, max_new_tokens=n, length_penalty=0.0)
    assert torch.equal(out.ids, best_seq)
    assert out.stats["scores"][0] == pytest.approx(best, abs=1e-4)


def _best_with_eos(m, ids, vocab, n, eos, length_penalty):
    """Brute force over every continuation that stops at its first EOS or after n tokens:
    argmax of sum log p / gen_len ** length_penalty."""
    best, best_seq = -math.inf, None
    with torch.no_grad():
        for cont in itertools.product(range(vocab), repeat=n):
            stop = cont.index(eos) + 1 if eos in cont else n
            if eos in cont[: stop - 1] or (stop < n and any(c != 0 for c in cont[stop:])):
                continue  # enumerate each stopped hypothesis once (tail fixed to 0)
            seq = torch.cat([ids, torch.tensor([cont[:stop]])], 1)
            logp = m(seq).log_softmax(-1)[0]
            t0 = ids.shape[1]
            score = sum(logp[t0 - 1 + i, cont[i]].item() for i in range(stop)) / stop**length_penalty
            if score > best:
                best, best_seq = score, seq
    return best, best_seq


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_with_eos_and_length_penalty_finds_brute_force_optimum(length_penalty):
    """A beam wide enough to keep every hypothesis must return the exact optimum of the
    length-normalised score, EOS-finished hypotheses included."""
    m = model(vocab=4, seed=1)
    ids, eos, n = torch.tensor([[0, 3]]), 2, 4
    best, best_seq = _best_with_eos(m, ids, 4, n, eos, length_penalty)
    other = _best_with_eos(m, ids, 4, n, eos, 1.0 - length_penalty)[1]
    assert not torch.equal(best_seq, other)  # the penalty decides the winner on this model
    out = beam_search(m, ids, beam_size=64, max_new_tokens=n, eos_id=eos, length_penalty=length_penalty, pad_id=0)
    assert out.lengths[0] == best_seq.shape[1]
    assert torch.equal(out.ids[0, : out.lengths[0]], best_seq[0])
    assert bool(out.finished[0]) == (best_seq[0, -1].item() == eos)
    assert out.stats["scores"][0] == pytest.approx(best, abs=1e-4)


# ----------------------------------------------------------------------------- speculative
def test_speculative_with_draft_equal_target_is_plain_greedy():
    m = model()
    ids = torch.randint(0, 30, (1, 4))
    g = SamplingParams(greedy=True)
    spec = speculative_generate(m, m, ids, max_new_tokens=20, num_draft=4, sampling=g)
    plain = generate(m, ids, max_new_tokens=20, sampling=g)
    assert torch.equal(spec.ids, plain.ids)
    assert spec.stats["acceptance_rate"] == 1.0


def test_speculative_greedy_with_other_draft_is_exact():
    target, draft = model(0), model(1, n_layer=1)
    ids = torch.randint(0, 30, (1, 4))
    g = SamplingParams(greedy=True)
    spec = speculative_generate(target, draft, ids, max_new_tokens=16, num_draft=3, sampling=g)
    assert torch.equal(spec.ids, generate(target, ids, max_new_tokens=16, sampling=g).ids)


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, str]:
    n = counts.sum()
    expected = probs * n
    keep = expected > 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
    dof = max(int(keep.sum()) - 1, 1)
    z = 3.09  # 99.9th percentile, Wilson-Hilferty approximation
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return chi2 < crit, f"chi2={chi2:.1f} dof={dof} crit={crit:.1f}"


def test_speculative_accept_step_preserves_target_distribution():
    """verify_draft with proposals from q yields tokens distributed as p (chi-square, fixed seed)."""
    from armodal.generation.decode import verify_draft

    v = 8
    target, draft = model(0, vocab=v), model(5, vocab=v, n_layer=1)
    ids = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        p = target(ids)[0, -2:].softmax(-1)  # [2, V]: p1 and (unused here) p2
        q = draft(ids)[0, -1].softmax(-1)
    gen = torch.Generator().manual_seed(0)
    n = 20000
    xs = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
    counts = torch.zeros(v)
    accepted = 0
    for x in xs:
        out = verify_draft([p[0], p[1]], [q], [x], gen)
        counts[out[0]] += 1
        accepted += out[0] == x and len(out) == 2
    ok, msg = chi2_ok(counts, p[0])
    assert ok, msg
    expected_rate = torch.minimum(p[0], q).sum().item()  # acceptance prob = sum_x min(p, q)
    assert abs(accepted / n - expected_rate) < 0.02


def test_speculative_end_to_end_first_token_distribution():
    v = 6
    target, draft = model(0, vocab=v), model(5, vocab=v, n_layer=1)
    ids = torch.tensor([[1, 4]])
    with torch.no_grad():
        p1 = target(ids)[0, -1].softmax(-1)
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(v)
    rates = []
    for _ in range(400):
        out = speculative_generate(target, draft, ids, max_new_tokens=3, num_draft=2,
                                   sampling=SamplingParams(temperature=1.0), generator=gen)
        counts[out.ids[0, 2]] += 1
        rates.append(out.stats["acceptance_rate"])
    ok, msg = chi2_ok(counts, p1)
    assert ok, msg
    assert 0.0 < sum(rates) / len(rates) < 1.0
