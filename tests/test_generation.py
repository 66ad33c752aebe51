"""Decoding: the settings object, processors on hand-made logits, the engine under every strategy."""

import itertools
import math

import pytest
import torch

from armodal.generation import (
    GenerationConfig,
    cfg_mix,
    generate,
    mask_disallowed,
    min_p,
    process,
    repetition_penalty,
    top_k,
    top_p,
)
from armodal.generation.fast import FastDecoder
from armodal.generation.speculative import accept
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
    p = GenerationConfig(temperature=0.5, top_k=3, top_p=0.8)
    out = process(LOGITS, p, allowed=torch.tensor([[True, False, True, True, True]]))
    assert kept(out) == {3, 4}  # mask drops 1; T=0.5 gives {3: .72, 4: .18, 2: .08}; top-3; p=0.8 keeps {3, 4}


def test_cfg_scale_endpoints():
    c, u = torch.randn(2, 7), torch.randn(2, 7)
    torch.testing.assert_close(cfg_mix(c, u, 0.0), u)
    torch.testing.assert_close(cfg_mix(c, u, 1.0), c)
    torch.testing.assert_close(cfg_mix(c, u, 3.0), u + 3 * (c - u))


# ----------------------------------------------------------------------------- the settings object
def test_config_validates_and_names_the_setting():
    with pytest.raises(ValueError, match="strategy='nucleus'"):
        GenerationConfig(strategy="nucleus")
    with pytest.raises(ValueError, match="top_p=0.0"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature=-1"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ValueError, match="compile='fast'"):
        GenerationConfig(compile="fast")
    with pytest.raises(ValueError, match="num_beams=.*only applies to strategy=beam"):
        GenerationConfig(num_beams=4)  # never silently ignored, even at its default value
    with pytest.raises(ValueError, match="draft_ckpt=.*strategy=speculative"):
        GenerationConfig(strategy="beam", draft_ckpt="d.ckpt")
    with pytest.raises(TypeError, match=r"unknown generation setting\(s\) \['greedy'\].*strategy, temperature"):
        GenerationConfig().replace(greedy=True)
    with pytest.raises(TypeError, match=r"conf/x.yaml: unknown generation setting\(s\) \['beams'\]"):
        GenerationConfig.from_dict({"beams": 3}, source="conf/x.yaml")


def test_config_normalises_and_fills_strategy_defaults():
    c = GenerationConfig.from_dict({"strategy": "beam", "compile": True, "top_k": 5.0, "seed": None})
    assert c.compile == "true" and c.top_k == 5 and isinstance(c.top_k, int) and c.seed is None
    assert c.num_beams is None and c.value("num_beams") == 4 and c.value("length_penalty") == 1.0
    assert c.replace(num_beams=2).value("num_beams") == 2
    assert GenerationConfig(temperature=0).is_greedy and GenerationConfig(strategy="greedy").is_greedy
    assert GenerationConfig(top_p=0.9, seed=3).changed() == {"top_p": 0.9, "seed": 3}
    with pytest.raises(Exception):  # frozen: one object handed on untouched
        c.temperature = 2.0


# ----------------------------------------------------------------------------- sample / greedy
GREEDY = GenerationConfig(strategy="greedy")


def test_greedy_matches_argmax_loop():
    m = model()
    ids = torch.randint(0, 30, (2, 5))
    out = generate(m, ids, GREEDY, max_new_tokens=12)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.ids, seq)
    assert torch.equal(generate(m, ids, GREEDY, max_new_tokens=12, use_cache=False).ids, seq)
    assert torch.equal(generate(m, ids, temperature=0, max_new_tokens=12).ids, seq)  # sample at T=0 is greedy
    assert not m.has_caches  # temporary caches are dropped


def test_max_new_tokens_defaults_to_the_room_left_and_is_bounded():
    m = model()
    assert generate(m, torch.zeros(1, 90, dtype=torch.long), GREEDY).ids.shape == (1, 96)
    with pytest.raises(ValueError, match="max_new_tokens=10 exceeds max_seq_len=96"):
        generate(m, torch.zeros(1, 90, dtype=torch.long), GREEDY, max_new_tokens=10)


def test_eos_stops_each_row_and_pads():
    m = model()
    ids = torch.randint(0, 30, (4, 3))
    ref = generate(m, ids, GREEDY, max_new_tokens=10)
    eos = ref.ids[0, 5].item()  # the token row 0 emits at its 3rd step
    out = generate(m, ids, GREEDY, max_new_tokens=10, eos_id=eos, pad_id=29)
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
    kw = dict(max_new_tokens=8, num_return_sequences=5)
    a = generate(m, torch.tensor([[1, 2]]), seed=7, stream=lambda step, tok: seen.append(tok.clone()), **kw)
    b = generate(m, torch.tensor([[1, 2]]), generator=torch.Generator().manual_seed(7), **kw)
    assert a.ids.shape == (5, 10) and torch.equal(a.ids, b.ids)  # seed= and generator= are the same thing
    assert torch.equal(torch.stack(seen, 1), a.ids[:, 2:])
    assert len({tuple(r) for r in a.ids.tolist()}) > 1  # 5 continuations differ
    assert not torch.equal(generate(m, torch.tensor([[1, 2]]), seed=8, **kw).ids, a.ids)


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
    n = 8
    base_u = generate(m, None, GREEDY, max_new_tokens=n, prefix=unc).ids
    base_c = generate(m, None, GREEDY, max_new_tokens=n, prefix=cond).ids
    assert torch.equal(base_u, _cfg_reference(m, cond, unc, 0.0, n))
    assert torch.equal(base_c, _cfg_reference(m, cond, unc, 1.0, n))
    # scale 0 runs the doubled batch: its conditional half must be ignored exactly
    s0 = generate(m, None, GREEDY, max_new_tokens=n, prefix=cond, uncond_prefix=unc, cfg_scale=0.0).ids
    s1 = generate(m, None, GREEDY, max_new_tokens=n, prefix=cond, uncond_prefix=unc, cfg_scale=1.0).ids
    assert torch.equal(s0, base_u) and torch.equal(s1, base_c)
    for scale in (0.5, 2.5, 4.0):  # the guidance path end to end, cached and uncached
        ref = _cfg_reference(m, cond, unc, scale, n)
        for use_cache in (True, False):
            out = generate(m, None, GREEDY, max_new_tokens=n, prefix=cond, uncond_prefix=unc, cfg_scale=scale,
                           use_cache=use_cache).ids
            assert torch.equal(out, ref), (scale, use_cache)
    guided = _cfg_reference(m, cond, unc, 4.0, n)
    assert not torch.equal(guided, base_c) and not torch.equal(guided, base_u)  # guidance changes the tokens
    with pytest.raises(ValueError, match="cfg_scale=3.0 needs a conditional prefix and an unconditional one"):
        generate(m, None, GREEDY, max_new_tokens=6, prefix=cond, cfg_scale=3.0)


def test_allowed_fn_constrains_every_step():
    m = model()
    allowed = torch.zeros(30, dtype=torch.bool)
    allowed[[3, 7, 11]] = True
    out = generate(m, torch.tensor([[0]]), max_new_tokens=20, allowed_fn=lambda ids: allowed.expand(ids.shape[0], -1),
                   seed=0)
    assert set(out.ids[0, 1:].tolist()) <= {3, 7, 11}


# ----------------------------------------------------------------------------- beam search
def _brute_force(m, ids, n, vocab, allowed=None):
    """Best continuation of n tokens by exhaustive search over the (masked, renormalised) model."""
    best, best_seq = -math.inf, None
    with torch.no_grad():
        for cont in itertools.product(range(vocab), repeat=n):
            seq = torch.cat([ids, torch.tensor([cont])], 1)
            logits = m(seq)[0]
            score = 0.0
            for i in range(n):
                row = logits[ids.shape[1] - 1 + i]
                if allowed is not None:
                    ok = allowed(seq[:, : ids.shape[1] + i])[0]
                    if not ok[cont[i]]:
                        score = -math.inf
                        break
                    row = row.masked_fill(~ok, -math.inf)
                score += row.log_softmax(-1)[cont[i]].item()
            if score > best:
                best, best_seq = score, seq
    return best, best_seq


def test_beam_search_finds_brute_force_optimum():
    m = model(vocab=5, seed=3)
    ids = torch.tensor([[0, 1]])
    best, best_seq = _brute_force(m, ids, 3, 5)
    out = generate(m, ids, strategy="beam", num_beams=25, max_new_tokens=3, length_penalty=0.0)
    assert torch.equal(out.ids, best_seq)
    assert out.stats["scores"][0] == pytest.approx(best, abs=1e-4)


def test_beam_search_with_grammar_mask_matches_brute_force():
    """Grammar: the next token differs from the previous one, and its parity alternates."""
    v = 6
    m = model(vocab=v, seed=4)

    def allowed(seq):
        last = seq[:, -1:]
        toks = torch.arange(v)[None]
        return (toks != last) & (toks % 2 != last % 2)

    ids = torch.tensor([[1, 2]])
    best, best_seq = _brute_force(m, ids, 4, v, allowed)
    out = generate(m, ids, strategy="beam", num_beams=v ** 2, max_new_tokens=4, length_penalty=0.0, allowed_fn=allowed)
    assert torch.equal(out.ids, best_seq)
    assert out.stats["scores"][0] == pytest.approx(best, abs=1e-4)
    unmasked = generate(m, ids, strategy="beam", num_beams=v ** 2, max_new_tokens=4, length_penalty=0.0)
    assert not torch.equal(unmasked.ids, best_seq)  # the mask mattered


def test_beam_with_one_beam_is_greedy_and_returns_the_best_hypotheses():
    m = model(seed=2)
    ids = torch.randint(0, 30, (3, 4))
    ref = generate(m, ids, GREEDY, max_new_tokens=9)
    assert torch.equal(generate(m, ids, strategy="beam", num_beams=1, max_new_tokens=9).ids, ref.ids)
    top = generate(m, ids, strategy="beam", num_beams=4, max_new_tokens=9, num_return_sequences=3)
    assert top.ids.shape == (9, 13) and len({tuple(r) for r in top.ids[:3].tolist()}) == 3
    s = top.stats["scores"]
    assert s[0] >= s[1] >= s[2]
    with pytest.raises(ValueError, match="at most num_beams=4"):
        generate(m, ids, strategy="beam", max_new_tokens=4, num_return_sequences=5)


def test_beam_with_prefix_guidance_eos_and_early_stopping():
    m = model(vocab=6, seed=1)
    cond, unc = torch.randn(2, 1, 32), torch.randn(2, 1, 32)
    ref = generate(m, None, strategy="beam", num_beams=3, max_new_tokens=5, prefix=unc)
    guided = generate(m, None, strategy="beam", num_beams=3, max_new_tokens=5, prefix=cond, uncond_prefix=unc, cfg_scale=0.0)
    assert torch.equal(guided.ids, ref.ids)  # guidance at scale 0 = the unconditional model, beams reordered in both halves
    a = generate(m, torch.tensor([[0]]), strategy="beam", num_beams=3, max_new_tokens=6, eos_id=2, early_stopping=True)
    b = generate(m, torch.tensor([[0]]), strategy="beam", num_beams=3, max_new_tokens=6, eos_id=2)
    assert a.ids.shape[0] == 1 and a.lengths[0] <= 7 and b.stats["scores"][0] >= a.stats["scores"][0] - 1e-6


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
    out = generate(m, ids, strategy="beam", num_beams=64, max_new_tokens=n, eos_id=eos, length_penalty=length_penalty,
                   pad_id=0)
    assert out.lengths[0] == best_seq.shape[1]
    assert torch.equal(out.ids[0, : out.lengths[0]], best_seq[0])
    assert bool(out.finished[0]) == (best_seq[0, -1].item() == eos)
    assert out.stats["scores"][0] == pytest.approx(best, abs=1e-4)


# ----------------------------------------------------------------------------- speculative and lookahead
@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_greedy_is_exact(batch):
    target, draft = model(0, init_std=0.5), model(1, n_layer=1, init_std=0.5)  # varied, not repetitive, outputs
    ids = torch.randint(0, 30, (batch, 4))
    plain = generate(target, ids, GREEDY, max_new_tokens=20)
    same = generate(target, ids, strategy="speculative", temperature=0, num_draft=4, max_new_tokens=20, draft=target)
    assert torch.equal(same.ids, plain.ids) and same.stats["acceptance_rate"] == 1.0
    other = generate(target, ids, strategy="speculative", temperature=0, num_draft=3, max_new_tokens=20, draft=draft)
    assert torch.equal(other.ids, plain.ids) and other.stats["acceptance_rate"] < 0.5


@pytest.mark.parametrize("n", [1, 3, 8])
def test_lookahead_greedy_is_exact(n):
    m = model(0, init_std=0.5)
    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4], [1, 1, 2, 2, 1, 1, 2, 2]])
    plain = generate(m, ids, GREEDY, max_new_tokens=30)
    out = generate(m, ids, strategy="lookahead", temperature=0, lookahead_size=n, max_new_tokens=30)
    assert torch.equal(out.ids, plain.ids)
    assert out.stats["target_forwards"] <= 30


def test_verifying_strategies_stop_rows_at_eos():
    m = model(0, init_std=0.5)
    ids = torch.randint(0, 30, (4, 3))
    ref = generate(m, ids, GREEDY, max_new_tokens=16)
    eos = ref.ids[1, 6].item()
    plain = generate(m, ids, GREEDY, max_new_tokens=16, eos_id=eos, pad_id=29)
    for kw in (dict(strategy="lookahead", lookahead_size=3), dict(strategy="speculative", draft=model(1, n_layer=1, init_std=0.5))):
        out = generate(m, ids, temperature=0, max_new_tokens=16, eos_id=eos, pad_id=29, **kw)
        assert torch.equal(out.ids[:, : plain.ids.shape[1]], plain.ids) and (out.ids[:, plain.ids.shape[1]:] == 29).all()
        assert torch.equal(out.lengths, plain.lengths) and torch.equal(out.finished, plain.finished)


def test_speculative_needs_a_draft_of_the_same_vocabulary():
    m = model(0)
    with pytest.raises(ValueError, match="needs a draft model"):
        generate(m, torch.tensor([[1]]), strategy="speculative", max_new_tokens=3)
    with pytest.raises(ValueError, match="draft's vocabulary \\(31\\) differs"):
        generate(m, torch.tensor([[1]]), strategy="speculative", max_new_tokens=3, draft=model(1, vocab=31))


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[bool, str]:
    n = counts.sum()
    expected = probs * n
    keep = expected > 5
    chi2 = (((counts - expected) ** 2 / expected)[keep]).sum().item()
    dof = max(int(keep.sum()) - 1, 1)
    z = 3.09  # 99.9th percentile, Wilson-Hilferty approximation
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return chi2 < crit, f"chi2={chi2:.1f} dof={dof} crit={crit:.1f}"


def test_accept_step_preserves_target_distribution():
    """accept() with proposals from q yields tokens distributed as p (chi-square), at rate sum min(p, q)."""
    v, n = 8, 20000
    target, draft = model(0, vocab=v), model(5, vocab=v, n_layer=1)
    ids = torch.tensor([[1, 4, 2]])
    with torch.no_grad():
        p = target(ids)[0, -2:].softmax(-1)  # [2, V]: p1 and p2
        q = draft(ids)[0, -1].softmax(-1)
    gen = torch.Generator().manual_seed(0)
    xs = torch.multinomial(q, n, replacement=True, generator=gen)[:, None]  # [n, 1]
    out, n_acc = accept(p.expand(n, 2, v), q.expand(n, 1, v), xs, greedy=False, generator=gen)
    ok, msg = chi2_ok(torch.bincount(out[:, 0], minlength=v).float(), p[0])
    assert ok, msg
    assert abs(n_acc.float().mean().item() - torch.minimum(p[0], q).sum().item()) < 0.02


def _joint_two(m, ids, config_kw, **kw):
    """Counts of the first two generated tokens over many rows of one batched call."""
    n = 6000
    out = generate(m, ids, max_new_tokens=2, num_return_sequences=n, seed=1, **config_kw, **kw)
    first, second = out.ids[:, ids.shape[1]], out.ids[:, ids.shape[1] + 1]
    v = m.config.vocab_size
    return torch.bincount(first * v + second, minlength=v * v).float(), out


def _exact_joint(m, ids, temperature):
    v = m.config.vocab_size
    with torch.no_grad():
        p1 = (m(ids)[0, -1] / temperature).softmax(-1)
        p2 = torch.stack([(m(torch.cat([ids, torch.tensor([[a]])], 1))[0, -1] / temperature).softmax(-1) for a in range(v)])
    return (p1[:, None] * p2).flatten()


@pytest.mark.parametrize("strategy", ["speculative", "lookahead"])
def test_sampled_verifying_strategies_are_exact_through_the_front_door(strategy):
    """Chi-square of the joint law of two generated tokens: batched speculative / lookahead sampling
    (rows advancing together) draw from the target's distribution."""
    v = 6
    target, draft = model(0, vocab=v), model(5, vocab=v, n_layer=1)
    ids = torch.tensor([[1, 4]])
    kw = {"draft": draft, "num_draft": 2} if strategy == "speculative" else {"lookahead_size": 2}
    counts, out = _joint_two(target, ids, {"strategy": strategy, "temperature": 0.8}, **kw)
    ok, msg = chi2_ok(counts, _exact_joint(target, ids, 0.8))
    assert ok, msg
    assert 0.0 < out.stats["acceptance_rate"] < 1.0


# ----------------------------------------------------------------------------- the compiled path
@pytest.mark.parametrize("strategy", ["greedy", "beam", "speculative", "lookahead"])
def test_static_cache_step_gives_the_same_tokens_for_every_strategy(strategy):
    """The FastDecoder path (persistent static caches, full-cache fixed-width step; eager mode
    here, the compiler itself is tested in test_perf.py and test_generation_modalities.py)."""
    m = model(0)
    ids = torch.randint(0, 30, (2, 4))
    kw = {"strategy": strategy, "temperature": 0, "max_new_tokens": 14}
    if strategy == "speculative":
        kw["draft"] = model(1, n_layer=1)
    ref = generate(m, ids, **kw)
    fast = FastDecoder(m, max_batch=8, max_len=32, mode="eager")
    out = generate(m, ids, decoder=fast, **kw)
    assert m.has_caches and m.caches_persistent  # kept for the next call
    fast.close()
    assert not m.has_caches
    assert torch.equal(out.ids, ref.ids)


# ----------------------------------------------------------------------------- on_probs
@pytest.mark.parametrize("kw", [dict(strategy="sample", top_k=7, temperature=0.8), dict(strategy="greedy"),
                                dict(strategy="lookahead", lookahead_size=3),
                                dict(strategy="speculative", num_draft=3, draft="other")], ids=lambda kw: kw["strategy"])
def test_on_probs_sees_the_distribution_of_every_kept_token(kw):
    """Every generated token gets one call, in order, with the ids before it and the processed distribution
    of that position given exactly those ids (recomputed here from scratch)."""
    m = model(0, init_std=0.5)
    kw = dict(kw)
    if kw.get("draft") == "other":
        kw["draft"] = model(1, n_layer=1, init_std=0.5)
    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4], [1, 1, 2, 2, 1, 1, 2, 2]])
    seen = []
    out = generate(m, ids, max_new_tokens=14, generator=torch.Generator().manual_seed(0),
                   on_probs=lambda seq, p: seen.append((seq.clone(), p.clone())), **kw)
    assert [s.shape[1] for s, _ in seen] == list(range(8, 22))
    cfg = GenerationConfig(temperature=0.0 if kw["strategy"] == "greedy" else kw.get("temperature", 1.0),
                           top_k=kw.get("top_k", 0))  # the processors the strategy applied
    for seq, p in seen:
        assert torch.equal(seq, out.ids[:, : seq.shape[1]])
        ref = process(m(seq)[:, -1], cfg)
        want = ref.softmax(-1) if not cfg.is_greedy else torch.nn.functional.one_hot(ref.argmax(-1), 30).float()
        torch.testing.assert_close(p, want, atol=1e-5, rtol=1e-4)
        assert torch.allclose(p.sum(-1), torch.ones(2))


def test_on_probs_is_refused_with_beam_search():
    with pytest.raises(ValueError, match="on_probs.*beam"):
        generate(model(0), torch.tensor([[1]]), strategy="beam", num_beams=2, max_new_tokens=3, on_probs=lambda s, p: None)
