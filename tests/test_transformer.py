"""The shared transformer: causality, cache equality, prefix and type streams, presets."""

import pytest
import torch

from armodal.models import Transformer, TransformerConfig, build_transformer


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=40, num_types=3, n_layer=2, n_head=4, d_model=64, max_seq_len=128)
    args.update(kw)
    return build_transformer(**args).eval()


@pytest.mark.parametrize("with_prefix", [False, True])
def test_causality_future_token_does_not_change_past_logits(with_prefix):
    m = tiny()
    ids = torch.randint(0, 40, (2, 16))
    prefix = torch.randn(2, 3, 64) if with_prefix else None
    p = 3 if with_prefix else 0
    a = m(ids, prefix=prefix)
    ids2 = ids.clone()
    ids2[:, 10] = (ids2[:, 10] + 1) % 40
    b = m(ids2, prefix=prefix)
    torch.testing.assert_close(a[:, : p + 10], b[:, : p + 10])
    assert not torch.allclose(a[:, p + 10 :], b[:, p + 10 :])


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cached_decoding_equals_full_forward(n_kv_head):
    m = tiny(n_kv_head=n_kv_head)
    ids = torch.randint(0, 40, (3, 20))
    prefix = torch.randn(3, 2, 64)
    types = ids % 3
    full = m(ids, prefix=prefix, types=types)  # [3, 22, V]
    m.setup_caches(3, 64)
    out = [m(ids[:, :5], prefix=prefix, types=types[:, :5], input_pos=torch.arange(7))]
    for t in range(5, 20):
        out.append(m(ids[:, t : t + 1], types=types[:, t : t + 1], input_pos=torch.tensor([2 + t])))
    cached = torch.cat(out, 1)
    m.clear_caches()
    assert not m.has_caches
    assert (cached - full).abs().max() < 1e-4


def test_kv_len_slicing_matches_full_cache():
    m = tiny()
    ids = torch.randint(0, 40, (1, 12))
    m.setup_caches(1, 64)
    a = m(ids, input_pos=torch.arange(12))
    m.setup_caches(1, 64)
    b = m(ids, input_pos=torch.arange(12), kv_len=12)
    torch.testing.assert_close(a, b)


def test_types_stream_changes_logits_and_requires_num_types():
    m = tiny()
    ids = torch.randint(0, 40, (1, 8))
    assert not torch.allclose(m(ids, types=torch.zeros_like(ids)), m(ids, types=torch.ones_like(ids)))
    with pytest.raises(ValueError, match="num_types=0"):
        tiny(num_types=0)(ids, types=torch.zeros_like(ids))


def test_tied_embeddings_and_sequence_limit():
    m = tiny()
    assert m.lm_head.weight is m.tok_emb.weight
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() == m.num_params() + 40 * 64  # one more [V, D] matrix, counted once each
    with torch.no_grad():  # tied: writing the output projection writes the input embedding too
        m.lm_head.weight[0].zero_()
        untied.lm_head.weight[0].zero_()
    assert not m.tok_emb.weight[0].any() and untied.tok_emb.weight[0].any()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 129, dtype=torch.long))


def test_input_pos_without_cache_is_a_clear_error():
    with pytest.raises(RuntimeError, match="setup_caches"):
        tiny()(torch.zeros(1, 2, dtype=torch.long), input_pos=torch.arange(2))


@pytest.mark.parametrize(
    "preset,lo,hi",
    [("tiny", 0.7e6, 1.3e6), ("small", 17e6, 23e6), ("base", 115e6, 130e6), ("medium", 330e6, 370e6)],
)
def test_size_presets(preset, lo, hi):
    """Non-embedding size for tiny/small; GPT-2 vocab (50257) totals for base/medium."""
    from omegaconf import OmegaConf

    from armodal.utils.config import CONF_DIR

    model_cfg = OmegaConf.load(CONF_DIR / "model" / f"{preset}.yaml")
    kw = {k: v for k, v in model_cfg.items() if k != "_target_"}
    config = TransformerConfig(vocab_size=50257 if preset in ("base", "medium") else 256, **kw)
    with torch.device("meta"):
        m = Transformer(config)
    n = m.num_params() if preset in ("base", "medium") else m.num_params(exclude_embeddings=True)
    assert lo <= n <= hi, f"{preset}: {n:,}"
