"""Quantised decoding (armodal.generation.quantize): correct on a trained tiny model, faithful kernels, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from armodal.generation import GenerationConfig, generate
from armodal.generation.fast import FastDecoder
from armodal.generation.quantize import (
    Int4WeightLinear, Int8WeightLinear, QUANTIZE_MODES, quantize_weights, weight_bytes,
)
from armodal.models import build_transformer
from armodal.training.loss import next_token_nll

GREEDY = GenerationConfig(strategy="greedy")
V = 48


def markov_batch(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Sequences of a sparse random Markov chain: each token has 3 successors (0.7 / 0.2 / 0.1)."""
    succ = torch.stack([torch.randperm(V, generator=torch.Generator().manual_seed(100 + i))[:3] for i in range(V)])
    probs = torch.tensor([0.7, 0.2, 0.1])
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (n,), generator=g)
    for t in range(1, length):
        pick = torch.multinomial(probs.expand(n, 3), 1, generator=g).squeeze(1)
        x[:, t] = succ[x[:, t - 1], pick]
    return x


@pytest.fixture(scope="module")
def trained():
    """A tiny transformer trained for a few seconds until its greedy choices are well defined."""
    torch.manual_seed(0)
    net = build_transformer(vocab_size=V, n_layer=2, n_head=4, d_model=64, max_seq_len=128)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        ids = markov_batch(32, 48, g)
        s, n = next_token_nll(net(ids), ids)
        (s / n).backward()
        opt.step()
        opt.zero_grad()
    net.eval()
    held_out = markov_batch(64, 48, torch.Generator().manual_seed(1))
    return net, held_out


def nll(net, ids) -> float:
    with torch.no_grad():
        s, n = next_token_nll(net(ids).float(), ids)
    return float(s / n)


# measured on this model: NLL +0.03 % (int8), +0.1 % (int8_dynamic), +0.07 % (int4), greedy 100 % identical;
# a 3.5-bit grid (13 levels per row) gives +0.65 % and 97.5 %: the NLL tolerances below catch it
@pytest.mark.parametrize("mode,nll_tol,match", [("int8", 0.002, 0.95), ("int8_dynamic", 0.004, 0.95),
                                                ("int4", 0.004, 0.95)])
def test_quantised_greedy_and_nll_match_fp32(trained, mode, nll_tol, match):
    net, held_out = trained
    ref_nll = nll(net, held_out)
    assert ref_nll < 1.2  # it learned the chain (uniform would be log 48 = 3.87; the chain's entropy is 0.80)
    q = copy.deepcopy(net)
    summary = quantize_weights(q, mode)
    assert summary["linears"] == 2 * 4 + 1
    assert abs(nll(q, held_out) - ref_nll) / ref_nll <= nll_tol
    prompts = held_out[:16, :4]
    a = generate(net, prompts, max_new_tokens=40, config=GREEDY).ids
    b = generate(q, prompts, max_new_tokens=40, config=GREEDY).ids
    assert (a[:, 4:] == b[:, 4:]).float().mean() >= match


def test_int8_fast_decoder_equals_eager_int8_engine(trained):
    """The static-cache step over int8 weights: eager fixed-shape step and compiled step give the engine's tokens."""
    net, held_out = trained
    q = copy.deepcopy(net)
    quantize_weights(q, "int8")
    prompts = held_out[:3, :5]
    ref = generate(q, prompts, max_new_tokens=12, config=GREEDY).ids
    fast = FastDecoder(q, max_batch=4, max_len=24, mode="eager")
    assert torch.equal(fast.generate(prompts, max_new_tokens=12, config=GREEDY).ids, ref)
    fast.close()
    torch._dynamo.reset()
    fast = FastDecoder(q, max_batch=4, max_len=24)  # compiled (inductor default mode on the CPU)
    assert torch.equal(fast.generate(prompts, max_new_tokens=12, config=GREEDY).ids, ref)
    fast.close()


def test_int8_linear_is_the_rounded_weight():
    torch.manual_seed(0)
    w = torch.randn(40, 64)
    lin = Int8WeightLinear(w)
    scale = w.abs().amax(1) / 127
    err = (lin.dequantized() - w).abs()
    # round to nearest with one scale per row; the kernel takes the scale in bf16 (8 significant bits)
    assert (err <= scale[:, None] / 2 + w.abs() * 2.0**-8 + 1e-6).all()
    assert err.max() > 0 and (err <= scale[:, None]).all()
    x = torch.randn(3, 5, 64)
    ref = x @ lin.dequantized().t()
    assert (lin(x) - ref).norm() / ref.norm() < 1e-2  # bf16 activations and output: ~0.3 % rounding
    assert lin(x).dtype == torch.float32 and lin(x).shape == (3, 5, 40)


def test_int4_linear_is_the_grouped_rounded_weight():
    torch.manual_seed(0)
    w = torch.randn(37, 128)  # 37 rows: padded to the kernel's 16-row blocks and sliced back
    lin = Int4WeightLinear(w, group_size=32)
    g = w.reshape(37, 4, 32)
    step = (g.amax(-1) - g.amin(-1)) / 15  # one quantisation step per group
    err = (lin.dequantized() - w).abs().reshape(37, 4, 32)
    assert (err <= step[..., None] * 0.51 + 1e-2).all()  # half a step (+ bf16 scale rounding)
    x = torch.randn(4, 128)
    assert lin(x).shape == (4, 37)
    ref = x @ lin.dequantized().t()
    assert (lin(x) - ref).norm() / ref.norm() < 1e-2


def test_weight_bytes_shrink_and_errors():
    net = build_transformer(vocab_size=64, n_layer=2, n_head=2, d_model=64, max_seq_len=32)
    fp32 = weight_bytes(net, decode_step=True)
    q8, q4 = copy.deepcopy(net), copy.deepcopy(net)
    quantize_weights(q8, "int8")
    quantize_weights(q4, "int4")
    assert weight_bytes(q8, decode_step=True) < 0.3 * fp32  # + norms and scales
    assert weight_bytes(q4, decode_step=True) < weight_bytes(q8, decode_step=True)
    assert q8.tok_emb.weight.dtype == torch.float32  # the lookup table keeps its rows
    assert quantize_weights(copy.deepcopy(net), "none")["linears"] == 0
    assert set(QUANTIZE_MODES) == {"none", "int8", "int4", "int8_dynamic"}
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_weights(copy.deepcopy(net), "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_weights(copy.deepcopy(net), "int4", group_size=48)
    with pytest.raises(ValueError, match="has a bias"):
        quantize_weights(torch.nn.Sequential(torch.nn.Linear(8, 8)), "int8")


def test_quantized_copy_is_cached_and_follows_weight_updates():
    from armodal.generation.quantize import quantized

    net = build_transformer(vocab_size=64, n_layer=1, n_head=2, d_model=64, max_seq_len=32)
    assert quantized(net, "none") is net
    q = quantized(net, "int8")
    assert q is not net and quantized(net, "int8") is q  # cached
    assert type(net.lm_head) is torch.nn.Linear  # the original is untouched
    with torch.no_grad():
        net.blocks[0].ffn.w2.weight.mul_(2.0)  # an in-place update (as an optimizer step makes)
    q2 = quantized(net, "int8")
    assert q2 is not q
    assert torch.allclose(q2.blocks[0].ffn.w2.dequantized(), net.blocks[0].ffn.w2.weight, atol=1e-2)
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantized(net, "fp8")
