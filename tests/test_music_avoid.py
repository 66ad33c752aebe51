"""Unlikelihood training against parallel fifths / octaves and voice crossings on the chorale grid
(``modality.data.avoid`` + ``module.unlikelihood_weight``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from armodal.modalities.music.analysis import crossings, parallels
from armodal.modalities.music.avoid import _row_avoid, _row_crossings, avoid_sets
from armodal.modalities.music.chorales import Chorale
from armodal.modalities.music.data import ChoraleDataModule, JSBDataModule
from armodal.modalities.music.tokenizer import ChoraleTokenizer, JSBTokenizer
from armodal.training.lit_module import ARLitModule
from armodal.training.loss import unlikelihood_sum

CORPUS = "datasets/bach_chorales/chorales.npz"


def _pair_parallel(prev, cur, u, v, c) -> bool:
    """The analysis' own rule on a two-sonority grid where only voices u and v may move."""
    a = np.array(prev, dtype=np.int64)
    b = a.copy()
    b[u], b[v] = cur[u], c
    _, p5, p8 = parallels(np.stack([a, b]))
    return bool(p5 or p8)


def test_avoid_sets_are_the_analysis_parallels_of_the_voices_above():
    """Every pitch in voice v's avoid set (and only those) makes the analysis count a parallel fifth or
    octave with some voice u above it, the true pitch excepted; the soprano's set is always empty."""
    rng = np.random.default_rng(0)
    low, high = 36, 81
    checked = hits = 0
    for _ in range(300):
        top = rng.integers(60, 76)  # a random four-voice chord and a random next one, voices in order
        prev = np.array([top, top - rng.integers(0, 9), top - rng.integers(7, 17), top - rng.integers(12, 26)], float)
        cur = prev + rng.choice([-7, -5, -4, -3, -2, -1, 0, 0, 1, 2, 3, 4, 5, 7], size=4)
        av = _row_avoid(np.stack([prev, cur]), low, high)  # [2, 4, P]
        assert not av[0].any() and not av[1, 0].any()  # no step before the first; the soprano has no voice above
        for v in range(1, 4):
            for c in range(low, high + 1):
                want = c != cur[v] and any(_pair_parallel(prev, cur, u, v, c) for u in range(v))
                assert av[1, v, c - low] == want, (prev, cur, v, c)
                checked += 1
                hits += want
    assert hits > 100 and checked > 10000  # the draw hit the rule often


def test_crossing_sets_are_the_analysis_crossings_with_the_voice_above():
    """Voice v's crossing set holds exactly the pitches that make the analysis see a crossing with voice v-1
    (voices below v placed out of the way), the true pitch excepted; with both rules the sets are the union."""
    rng = np.random.default_rng(1)
    low, high = 36, 81
    for _ in range(100):
        chord = np.sort(rng.integers(40, 78, size=4))[::-1].astype(float)
        av = _row_crossings(chord[None], low, high)[0]  # [4, P]
        assert not av[0].any()
        for v in range(1, 4):
            for c in range(low, high + 1):
                probe = np.array([chord[0], chord[1], chord[2], chord[3]])
                probe[v] = c
                probe[v + 1 :] = 0  # voices still to come: out of the way
                want = c != chord[v] and bool(crossings(probe[None, : v + 1])[0])
                assert av[v, c - low] == want, (chord, v, c)
    tok = ChoraleTokenizer(hold_types=8)
    grid = np.array([[67, 62, 55, 43], [69, 64, 57, 45]], float)
    ids = tok.encode(Chorale("x", grid, np.zeros(2, bool), 7, "major", 16, 0))[None]
    both = avoid_sets(tok, ids, ("parallels", "crossings"))
    assert torch.equal(both, avoid_sets(tok, ids, ("parallels",)) | avoid_sets(tok, ids, ("crossings",)))
    with pytest.raises(ValueError, match="avoid rules"):
        avoid_sets(tok, ids, ("paralels",))


def test_avoid_mask_sits_on_the_voice_step_tokens_of_a_window():
    """avoid_sets maps the sets onto the right token positions and pitch ids for both grids, never
    marks the true token, and leaves header / special positions empty."""
    grid = np.array([[67, 62, 55, 43], [69, 64, 57, 45], [69, 64, 57, 45]], float)  # S-T and A-B... move in 8ves/5ths
    for tok in (JSBTokenizer(), ChoraleTokenizer(hold_types=8)):
        piece = grid if type(tok) is JSBTokenizer else Chorale("x", grid, np.zeros(3, bool), 7, "major", 16, 0)
        ids = tok.encode(piece)[None]
        av = avoid_sets(tok, ids, ("parallels",))
        start = int(tok.body_start(ids)[0])
        assert not av[0, :start].any() and not av[0, start : start + 4].any()  # header and step 0
        assert not av.gather(-1, ids[..., None]).any()  # the true tokens
        step1 = av[0, start + 4 : start + 8]  # step 1: S 67->69; A 62->64; T 55->57 (8ve with S); B 43->45
        rows = _row_avoid(grid, tok.low, tok.high)[1]
        assert torch.equal(step1[:, tok.num_specials : tok.num_specials + 46], torch.from_numpy(rows))
        # tenor: 55 -> ? with soprano 67 -> 69 (an octave apart): 57 is the parallel octave, and it is the true
        # pitch, so not in the set; 45 and 69 (same pitch class, upward? 45 is down) -> only upward 8ves count
        t_set = {p + tok.low - tok.num_specials for p in step1[2].nonzero().flatten().tolist()}
        assert 69 in t_set and 57 not in t_set and 45 not in t_set
        assert not av[0, start + 8 :].any()  # step 2 holds every voice: nothing moves, no sets


def test_unlikelihood_sum_is_minus_log_one_minus_the_avoided_mass():
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    avoid = torch.zeros(2, 5, 7, dtype=torch.bool)
    avoid[0, 2, [1, 4]] = True  # target position 2 is predicted by logits[:, 1]
    avoid[1, 4, 0] = True
    got = unlikelihood_sum(logits, ids, avoid)
    two = unlikelihood_sum(logits, ids, torch.stack([avoid, avoid]), weights=torch.tensor([2.0, 0.5]))
    assert two.item() == pytest.approx(2.5 * got.item(), rel=1e-5)
    p = logits.softmax(-1)
    want = -math.log(1 - (p[0, 1, 1] + p[0, 1, 4]).item()) - math.log(1 - p[1, 3, 0].item())
    assert got.item() == pytest.approx(want, rel=1e-5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 4] = False  # outside the loss mask: adds nothing
    assert unlikelihood_sum(logits, ids, avoid, loss_mask=mask).item() == pytest.approx(
        -math.log(1 - (p[0, 1, 1] + p[0, 1, 4]).item()), rel=1e-5)


def test_unlikelihood_lowers_the_avoided_mass_and_refusals():
    """A few steps with the unlikelihood term lower the probability of the avoid sets on a real chorale batch
    (plain NLL training at the same seed does not do it as much); a batch with sets and weight 0, or
    weight > 0 without sets, is refused; the data option is a bool."""
    from armodal.models import Transformer, TransformerConfig

    dm = ChoraleDataModule(CORPUS, batch_size=8, window_steps=32, stride_steps=16, avoid=["parallels"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["avoid"].shape[0] == 1 and batch["avoid"].any() and batch["avoid_weight"].tolist() == [1.0]
    val = next(iter(dm.val_dataloader()))
    assert "avoid" not in val  # validation reports the plain NLL

    def bad_mass(module):
        with torch.no_grad():
            logits = module.net(batch["ids"], types=batch["types"])[:, :-1].float().softmax(-1)
        av = batch["avoid"][0][:, 1:]
        return float((logits * av).sum(-1)[av.any(-1)].mean())

    masses = {}
    for w in (0.0, 50.0):
        torch.manual_seed(0)
        net = Transformer(TransformerConfig(vocab_size=dm.tokenizer.vocab_size, num_types=dm.tokenizer.num_types,
                                            d_model=32, n_head=2, n_layer=1, max_seq_len=160))
        mod = ARLitModule(net, tokenizer=dm.tokenizer, unlikelihood_weight=w)
        mod.log = lambda *a, **k: None
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        b = batch if w else {k: v for k, v in batch.items() if k != "avoid"}
        for _ in range(30):
            opt.zero_grad()
            mod.training_step(b, 0).backward()
            opt.step()
        masses[w] = bad_mass(mod)
    assert masses[50.0] < 0.7 * masses[0.0], masses  # a 1-layer net after 30 steps: 0.050 -> 0.029

    mod = ARLitModule(net, tokenizer=dm.tokenizer, unlikelihood_weight=0.0)
    with pytest.raises(ValueError, match="unlikelihood_weight is 0"):
        mod.training_step(batch, 0)
    mod = ARLitModule(net, tokenizer=dm.tokenizer, unlikelihood_weight=1.0)
    with pytest.raises(ValueError, match="needs training batches with avoid sets"):
        mod.training_step({k: v for k, v in batch.items() if k != "avoid"}, 0)
    with pytest.raises(ValueError, match="unlikelihood_weight"):
        ARLitModule(net, unlikelihood_weight=-1.0)
    for bad in ("parallels", ["parallel"], ["parallels", "parallels"], {"parallels": -1}, {"crossings": "x"}, {"paralels": 1}):
        with pytest.raises(ValueError, match="modality.data.avoid"):
            JSBDataModule("unused", avoid=bad)
    dm2 = ChoraleDataModule(CORPUS, batch_size=8, window_steps=32, stride_steps=16,
                            avoid={"parallels": 5.0, "crossings": 1.0})
    b2 = dm2.collate([dm2.train_dataloader().dataset[i] for i in range(4)], avoid=True)
    assert b2["avoid"].shape[0] == 2 and b2["avoid_weight"].tolist() == [5.0, 1.0]
    off = ChoraleDataModule(CORPUS, batch_size=8, window_steps=32, stride_steps=16,
                            avoid={"parallels": 0, "crossings": 0})  # the config's default: every rule off
    assert "avoid" not in off.collate([off.train_dataloader().dataset[0]], avoid=True)
    assert torch.equal(b2["avoid"][1], avoid_sets(dm2.tokenizer, b2["ids"], ("crossings",)))


# ----------------------------------------------------------------------------- the same rules at decoding time
def test_next_flags_are_the_avoid_sets_of_the_next_position():
    """``flagged_next(ids[:, :p], rule)`` is, at every voice-step position p of real chorales, exactly the set
    avoid_sets marks at p, plus the true pitch when that pitch itself breaks the rule (avoid_sets leaves it out)."""
    dm = ChoraleDataModule(CORPUS, batch_size=4, window_steps=24, stride_steps=24)
    tok = dm.tokenizer
    ids = dm.collate([dm.train_dataloader().dataset[i] for i in (0, 7, 30)])["ids"]
    starts = tok.body_start(ids)
    start = int(starts.min())
    breaches = 0
    for rule in ("parallels", "crossings"):
        sets = avoid_sets(tok, ids, (rule,))
        for p in range(start, ids.shape[1]):
            got = tok.flagged_next(ids[:, :p], rule)
            true_hit = got.gather(-1, ids[:, p : p + 1]).squeeze(-1)
            got_wo_true = got.clone()
            got_wo_true[torch.arange(len(ids)), ids[:, p]] = False
            assert torch.equal(got_wo_true, sets[:, p]), (rule, p)
            soprano = ((p - starts) % 4 == 0) | (p < starts)
            assert not got[soprano].any()  # the soprano (nothing above it) and the header: nothing flagged
            breaches += int(true_hit.sum())
        # Bach's own notes that break the rule show up as flagged (his crossings are not rare)
    assert breaches > 0
    with pytest.raises(ValueError, match="style rule 'paralels'"):
        tok.flagged_next(ids[:, : start + 5], "paralels")


def test_rule_penalty_in_decoding_and_refusals():
    """rule_penalty={parallels: inf, crossings: inf} leaves an untrained model's samples with no parallel
    fifth / octave and no crossing (the model alone writes many); a finite penalty lowers the flagged logits
    by exactly its nats; a rule the tokenizer lacks, or a tokenizer without rules, is refused by name."""
    from armodal.generation import GenerationConfig, UnsupportedSetting
    from armodal.generation.processors import rule_penalty
    from armodal.modalities.music.analysis import crossings, parallels
    from armodal.modalities.tokens.tokenizer import TokensTokenizer
    from tests.test_music_harmonize import tiny_model

    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, float("-inf"), 1.0]])
    flag = torch.tensor([[False, True, True], [True, False, True]])
    out = rule_penalty(logits, {"parallels": flag}, {"parallels": 1.5})
    assert torch.equal(out, torch.tensor([[0.0, -0.5, 0.5], [1.5, float("-inf"), -0.5]]))
    hard = rule_penalty(logits, {"parallels": flag}, {"parallels": float("inf")})
    assert torch.equal(hard[0], torch.tensor([0.0, float("-inf"), float("-inf")]))
    assert torch.equal(hard[1], logits[1])  # every allowed token flagged: the row is left as it was

    tok = ChoraleTokenizer(hold_types=8)
    model = tiny_model(tok, max_seq_len=260)
    counts = {}
    for pen in (None, {"parallels": float("inf"), "crossings": float("inf")}):
        out = model.generate(config=GenerationConfig(seed=0, rule_penalty=pen), num_samples=6)
        par = cross = 0
        for i in range(6):
            grid = tok.to_chorale(out.ids[i, : out.lengths[i]]).grid
            full = ~np.isnan(grid).any(1)  # the rules read the step before; rests break the chain
            for s in range(1, len(grid)):
                if full[s - 1] and full[s]:
                    par += sum(parallels(grid[s - 1 : s + 1].astype(np.int64))[1:])
            cross += int(crossings(grid[full]).sum())
        counts[str(pen)] = (par, cross)
    free, ruled = counts.values()
    assert free[0] > 5 and free[1] > 20, counts  # the untrained model breaks both rules freely
    assert ruled == (0, 0), counts

    with pytest.raises(UnsupportedSetting, match="rule_penalty.*has the style rules parallels, crossings, cadences, not 'fifths'"):
        model.generate(config=GenerationConfig(rule_penalty={"fifths": 2}))
    with pytest.raises(ValueError, match="rule_penalty.*>= 0"):
        GenerationConfig(rule_penalty={"parallels": -1})
    with pytest.raises(ValueError, match="rule_penalty.*mapping"):
        GenerationConfig(rule_penalty=3)
    assert GenerationConfig(rule_penalty={}).rule_penalty is None  # {} switches a modality's default off
    assert GenerationConfig(rule_penalty={"parallels": 1}).replace(rule_penalty={}).rule_penalty is None
    plain = tiny_model(TokensTokenizer(20))
    with pytest.raises(UnsupportedSetting, match="rule_penalty.*TokensTokenizer has no style rules"):
        plain.generate(config=GenerationConfig(rule_penalty={"parallels": 2}), max_new_tokens=3)
