"""Fast decode path: the compiled static-cache step gives the eager tokens; cache reuse is safe."""

from __future__ import annotations

import pytest
import torch

from armodal.generation import GenerationConfig, generate
from armodal.generation.fast import FastDecoder, compile_step, default_compile_mode
from armodal.models import build_transformer

GREEDY = GenerationConfig(strategy="greedy")


def tiny(num_types: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    return build_transformer(vocab_size=97, num_types=num_types, n_layer=2, n_head=4, n_kv_head=2,
                             d_model=64, max_seq_len=64).eval()


def test_default_modes():
    assert default_compile_mode("cuda") == "reduce-overhead"
    assert default_compile_mode("cpu") == "default"


def test_static_step_eager_matches_sliced_engine():
    """The fixed-shape step (full static cache + mask row, no kv_len) equals the sliced eager path."""
    m = tiny(num_types=3)
    ids = torch.randint(0, 97, (3, 5))

    def types_fn(x):
        return torch.arange(x.shape[1]).remainder(3).expand(x.shape[0], -1)

    ref = generate(m, ids, max_new_tokens=12, config=GREEDY, types_fn=types_fn).ids
    fast = FastDecoder(m, max_batch=4, max_len=40, mode="eager")
    out = fast.generate(ids, max_new_tokens=12, config=GREEDY, types_fn=types_fn).ids
    assert torch.equal(out, ref)
    # caches persist across calls and serve a smaller batch / shorter prompt unchanged
    k_buf = m.blocks[0].attn.kv_cache.k
    out2 = fast.generate(ids[:2, :3], max_new_tokens=9, config=GREEDY, types_fn=types_fn).ids
    assert m.blocks[0].attn.kv_cache.k is k_buf
    fast.close()
    assert not m.has_caches
    assert torch.equal(out2, generate(m, ids[:2, :3], max_new_tokens=9, config=GREEDY, types_fn=types_fn).ids)


def test_persistent_caches_do_not_leak_between_calls_sampling():
    """Stale slots from a longer earlier call must not change a later (sampled) call."""
    m = tiny()
    fast = FastDecoder(m, max_batch=2, max_len=48, mode="eager")
    fast.generate(torch.randint(0, 97, (2, 20)), max_new_tokens=20, config=GREEDY)  # fill the cache
    ids = torch.randint(0, 97, (2, 4))
    sp = GenerationConfig(temperature=0.9, top_k=20)
    a = fast.generate(ids, max_new_tokens=10, config=sp, generator=torch.Generator().manual_seed(3)).ids
    fast.close()
    b = generate(m, ids, max_new_tokens=10, config=sp, generator=torch.Generator().manual_seed(3)).ids
    assert torch.equal(a, b)


def test_beam_search_with_persistent_caches():
    m = tiny()
    ids = torch.randint(0, 97, (2, 4))
    ref = generate(m, ids, strategy="beam", num_beams=3, max_new_tokens=6)
    fast = FastDecoder(m, max_batch=6, max_len=16, mode="eager")
    out = generate(m, ids, strategy="beam", num_beams=3, max_new_tokens=6)
    assert m.has_caches  # kept: the persistent caches served the beams
    fast.close()
    assert torch.equal(out.ids, ref.ids)


def test_fast_decoder_rejects_calls_beyond_its_bounds():
    m = tiny()
    fast = FastDecoder(m, max_batch=2, max_len=16, mode="eager")
    with pytest.raises(ValueError, match="max_batch=2 x max_len=16"):
        fast.generate(torch.zeros(3, 4, dtype=torch.long), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_len=16"):
        fast.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=8)
    with pytest.raises(ValueError, match="static cache"):
        fast.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=4, use_cache=False)
    fast.close()


def test_compiled_step_gives_eager_tokens():
    """torch.compile'd step (CPU default mode) == eager greedy tokens, one compile."""
    torch._dynamo.reset()
    m = tiny()
    ids = torch.randint(0, 97, (2, 6))
    ref = generate(m, ids, max_new_tokens=16, config=GREEDY).ids
    fast = FastDecoder(m, max_batch=2, max_len=24)
    assert fast.mode == "default"
    out = fast.generate(ids, max_new_tokens=16, config=GREEDY).ids
    assert torch.equal(out, ref)
    # another prompt length reuses the same graph (no recompilation)
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    out2 = fast.generate(ids[:, :3], max_new_tokens=10, config=GREEDY).ids
    assert counters["stats"]["unique_graphs"] == before
    fast.close()
    assert torch.equal(out2, generate(m, ids[:, :3], max_new_tokens=10, config=GREEDY).ids)


def test_compile_step_eager_mode_is_uncompiled():
    """``eager`` is the reference: no dynamo frame is ever traced, and it returns what the model returns."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step = compile_step("eager")
    m = tiny()
    ids = torch.tensor([[5, 7, 9]])
    m.setup_caches(1, 8)
    outs = [step(m, ids[:, i : i + 1], None, torch.tensor([i])) for i in range(3)]
    m.clear_caches()
    assert sum(counters["frames"].values()) == 0 and not counters["stats"]  # nothing compiled or traced
    assert not isinstance(step.compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert not hasattr(step.compiled, "_torchdynamo_orig_callable")  # not a torch.compile wrapper either
    with torch.no_grad():
        ref = m(ids)  # uncached full forward
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-5, rtol=1e-5)


def test_weight_layout_keeps_values_and_trains():
    from armodal.generation.fast import set_weight_layout

    m = tiny()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = m(ids)
    n = set_weight_layout(m, "in_out")
    assert n == 2 * 4 + 1  # wqkv, wo, w13, w2 per block + the (tied) head
    w = m.blocks[0].attn.wqkv.weight
    assert w.shape == ref["blocks.0.attn.wqkv.weight"].shape and w.t().is_contiguous()
    assert m.lm_head.weight is m.tok_emb.weight  # still tied
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref[k]), k
    with torch.no_grad():
        assert torch.allclose(m(ids), before, atol=1e-5)
    m.train()
    m(ids).logsumexp(-1).mean().backward()  # gradients flow with the re-strided weights
    assert w.grad is not None and w.grad.shape == w.shape
    assert set_weight_layout(m, "out_in") == n and m.blocks[0].attn.wqkv.weight.is_contiguous()
    assert set_weight_layout(m, "out_in") == 0
    with pytest.raises(ValueError, match="layout"):
        set_weight_layout(m, "columns")


def test_frozen_compiled_step_gives_eager_tokens():
    """The inductor-freezing mode (prepacked oneDNN weights) gives the eager greedy tokens too."""
    torch._dynamo.reset()
    m = tiny()
    ids = torch.randint(0, 97, (2, 6))
    ref = generate(m, ids, max_new_tokens=12, config=GREEDY).ids
    fast = FastDecoder(m, max_batch=2, max_len=24, mode="freeze")
    out = fast.generate(ids, max_new_tokens=12, config=GREEDY).ids
    fast.close()
    assert torch.equal(out, ref)


def test_top_k_sampling_draws_from_the_top_k_distribution():
    """sample() with top-k draws inside the k largest only, with the renormalised probabilities."""
    from armodal.generation import process, sample

    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 1.5, 0.0])
    sp = GenerationConfig(temperature=0.8, top_k=3)
    n = 40000
    draws = sample(process(logits.expand(n, -1), sp), sp, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6).float() / n
    expect = torch.zeros(6)
    expect[[0, 4, 2]] = torch.softmax(logits[[0, 4, 2]] / 0.8, 0)
    assert counts[[1, 3, 5]].sum() == 0  # never outside the top 3
    assert torch.allclose(counts, expect, atol=0.01)  # 3 sd of a frequency at n = 40000 is < 0.008
    # a grammar mask leaving fewer than k tokens: only the allowed ones are drawn
    allowed = torch.tensor([False, True, False, False, False, True])
    d2 = sample(process(logits.expand(1000, -1), sp, allowed=allowed), sp, torch.Generator().manual_seed(1))
    assert set(d2.tolist()) <= {1, 5} and len(set(d2.tolist())) == 2
