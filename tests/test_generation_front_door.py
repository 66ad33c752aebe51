"""The settings object through the front doors: ARModel.generate, the samplers, armodal-generate's routing."""

from __future__ import annotations

import pytest
import torch

from armodal.ar_model import ARModel
from armodal.generate import route_overrides
from armodal.generation import GenerationConfig, UnsupportedSetting
from armodal.models import build_transformer


def tokens_model(tmp_path, seed: int = 0) -> ARModel:
    from armodal.modalities.tokens import TokensDataModule, write_toy_corpus

    write_toy_corpus(tmp_path / "toy", vocab_size=8, length=12, n_train=20)
    dm = TokensDataModule(str(tmp_path / "toy"), seq_len=16, batch_size=4)
    dm.setup("fit")
    torch.manual_seed(seed)
    net = build_transformer(vocab_size=dm.tokenizer.vocab_size, d_model=32, n_layer=2, n_head=2, max_seq_len=48,
                            init_std=0.3)
    return ARModel(net, dm.tokenizer).eval()


def jsb_model(seed: int = 0) -> ARModel:
    from armodal.modalities.music import JSBTokenizer

    tok = JSBTokenizer()
    torch.manual_seed(seed)
    net = build_transformer(vocab_size=tok.vocab_size, num_types=tok.num_types, d_model=32, n_layer=1, n_head=2,
                            max_seq_len=80, init_std=0.3)
    return ARModel(net, tok).eval()


def test_route_overrides_sends_settings_and_inputs_to_their_nodes():
    out = route_overrides(["ckpt=a.ckpt", "num_samples=2", "strategy=beam", "num_beams=4", "prompt=x.mid",
                           "sampler.qpm=90", "generation.top_k=5", "inputs.section=C2", "+x=1", "--cfg"])
    assert out == ["ckpt=a.ckpt", "num_samples=2", "++generation.strategy=beam", "++generation.num_beams=4",
                   "++inputs.prompt=x.mid", "sampler.qpm=90", "++generation.top_k=5", "++inputs.section=C2", "+x=1",
                   "--cfg"]


def test_generate_builds_the_config_with_overrides(tmp_path):
    model = tokens_model(tmp_path)
    base = GenerationConfig(strategy="greedy", max_new_tokens=8)
    a = model.generate(config=base)
    b = model.generate(max_new_tokens=8, temperature=0)  # sample at T=0 is greedy
    assert torch.equal(a.ids, b.ids)
    c = model.generate(config=base, num_samples=3)  # a deterministic strategy: one decode, repeated rows
    assert c.ids.shape[0] == 3 and (c.ids == a.ids).all()
    with pytest.raises(TypeError, match=r"unknown generation setting\(s\) \['greedy'\]"):
        model.generate(greedy=True)


def test_settings_a_model_cannot_honour_are_named_errors(tmp_path):
    model = tokens_model(tmp_path)
    with pytest.raises(UnsupportedSetting, match="cfg_scale=3.0 is not supported by modality 'tokens': the model has "
                                                 "no conditioner"):
        model.generate(cfg_scale=3.0, max_new_tokens=4)
    with pytest.raises(UnsupportedSetting, match="constrained=False is not supported by modality 'tokens': "
                                                 "TokensTokenizer has no grammar"):
        model.generate(constrained=False, max_new_tokens=4)
    with pytest.raises(ValueError, match="strategy=speculative needs a draft model: draft_ckpt=PATH"):
        model.generate(strategy="speculative", max_new_tokens=4)
    jsb = jsb_model()  # it has a grammar: constrained=False is honoured
    free = jsb.generate(constrained=False, max_new_tokens=60, seed=0, num_samples=4)
    kept = jsb.generate(max_new_tokens=60, seed=0, num_samples=4)
    errors = lambda out: sum(jsb.tokenizer.grammar_errors(r[:n]) for r, n in zip(out.ids, out.lengths))  # noqa: E731
    assert errors(kept) == 0 and errors(free) > 0


def test_speculative_through_the_front_door_with_a_draft_of_another_tokenizer_is_refused(tmp_path):
    from armodal.modalities.music import JSBTokenizer

    target = jsb_model()
    other = ARModel(build_transformer(vocab_size=JSBTokenizer(beat_types=True).vocab_size,
                                      num_types=JSBTokenizer(beat_types=True).num_types, d_model=16, n_layer=1,
                                      n_head=2, max_seq_len=80), JSBTokenizer(beat_types=True))
    with pytest.raises(ValueError, match="draft: its tokenizer .* differs from the target's"):
        target.check_draft(other)
    target.draft = jsb_model(seed=1)
    out = target.generate(strategy="speculative", temperature=0, max_new_tokens=30)
    assert torch.equal(out.ids, target.generate(strategy="greedy", max_new_tokens=30).ids)


def test_samplers_take_the_config_untouched_and_reject_unknown_inputs(tmp_path):
    from armodal.modalities.tokens import TokensSampler

    model = tokens_model(tmp_path)
    sampler = TokensSampler({"max_new_tokens": 6, "seed": 1})
    assert sampler.generation == GenerationConfig(max_new_tokens=6, seed=1)
    a = sampler(model, 3, tmp_path / "a")
    b = sampler(model, 3, tmp_path / "b", config=GenerationConfig(max_new_tokens=6, seed=1))
    c = sampler(model, 3, tmp_path / "c", config=GenerationConfig(max_new_tokens=6, seed=1, strategy="beam",
                                                                  num_beams=3))
    read = lambda d: (d / "samples.json").read_text()  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b") != read(tmp_path / "c")
    assert a["num_samples"] == b["num_samples"] == c["num_samples"] == 3
    with pytest.raises(TypeError, match=r"TokensSampler got unknown input\(s\) \['melody'\]; it takes \['prompt'\]"):
        sampler(model, 1, tmp_path / "d", melody="x.mid")
    with pytest.raises(TypeError, match="TokensSampler generation defaults: unknown generation setting"):
        TokensSampler({"temprature": 0.5})
