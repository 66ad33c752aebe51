"""Contract kit for the tokens modality."""

from __future__ import annotations

from armodal.modalities.tokens import TokensDataModule, TokensTokenizer, write_toy_corpus

MODALITY = "tokens"
EXPERIMENTS = ("tokens_toy",)


def tokenizers(tmp):
    tok = TokensTokenizer(4, tokens=["do", "re", "mi", "fa"])
    return {"tokens": (tok, [[0, 2, 1], "do mi fa re", []])}


def representable(tok, item):
    if isinstance(item, str):
        return [tok.tokens.index(t) for t in item.split()]
    return list(item)


def datamodules(tmp):
    write_toy_corpus(tmp / "toy", vocab_size=8, length=20, n_train=24)
    return {"tokens": TokensDataModule(str(tmp / "toy"), seq_len=16, batch_size=4)}


def experiments(tmp):
    return {"tokens_toy": [f"modality.data.path={tmp / 'toy'}", "modality.evaluator.num_samples=4"]}
