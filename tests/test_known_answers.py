"""Known answers for the numbers every headline result depends on: the next-token loss and
dataset NLL (with a prefix and padding), the spatial metrics and ridge baseline, the music piece
statistics, and the image Fréchet distance.  Each input is small and built by hand; each expected
value is worked out independently of the code under test (in the comments, or by a plain loop)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from symusic import Note, Score, Tempo, Track
from torch import nn

from armodal import ARModel
from armodal.models import build_transformer
from armodal.modalities.image import frechet_distance
from armodal.modalities.music import JSBDataModule, MusicEvaluator, compare_sets, piece_stats
from armodal.modalities.spatial import interval_coverage, pearson_per_gene, ridge_baseline
from armodal.modalities.tokens import TokensTokenizer
from armodal.training import dataset_nll, next_token_nll

PAD = 7


# ----------------------------------------------------------------------------- next-token loss
def _nll(row: torch.Tensor, target: int) -> float:
    """-log softmax(row)[target], written out: log sum exp minus the target logit."""
    vals = [float(v) for v in row]
    top = max(vals)
    return top + math.log(sum(math.exp(v - top) for v in vals)) - vals[target]


IDS = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 2, PAD, PAD], [3, PAD, PAD, PAD, PAD]])


@pytest.mark.parametrize("prefix_len", [0, 1, 3])
def test_next_token_nll_aligns_positions_with_the_tokens_they_predict(prefix_len):
    torch.manual_seed(0)
    logits = torch.randn(3, prefix_len + 5, 8)
    total, count = next_token_nll(logits, IDS, prefix_len, pad_id=PAD)
    expected, n = 0.0, 0
    for b in range(3):
        for t in range(5):
            if IDS[b, t] == PAD:
                continue
            if prefix_len == 0 and t == 0:
                continue  # the first token has no predictor without a prefix
            # the output at sequence position s predicts the next input; token t sits at position prefix_len + t
            expected += _nll(logits[b, prefix_len + t - 1], int(IDS[b, t]))
            n += 1
    assert n == {0: 6, 1: 9, 3: 9}[prefix_len]  # 4 + 2 + 0 targets; with a prefix every token is one: 5 + 3 + 1
    assert int(count) == n
    assert float(total) == pytest.approx(expected, rel=1e-5)


def test_next_token_nll_explicit_loss_mask_overrides_padding():
    torch.manual_seed(1)
    logits = torch.randn(1, 2 + 4, 5)
    ids = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[False, True, False, True]])  # only tokens 1 and 3 are targets
    total, count = next_token_nll(logits, ids, 2, loss_mask=mask, pad_id=PAD)
    assert int(count) == 2
    assert float(total) == pytest.approx(_nll(logits[0, 2], 2) + _nll(logits[0, 4], 4), rel=1e-5)


class _Prefix(nn.Module):
    """A 3-vector prefix from an integer condition (the shape every conditioner returns)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(4, 3 * d_model)
        self.d_model = d_model

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.emb(cond).view(cond.shape[0], 3, self.d_model)  # [B, 3, D]


def test_dataset_nll_is_token_weighted_over_batches_with_prefix_and_padding():
    """Reference: for every target token, run the net on (prefix, tokens before it) and read the
    last position.  Causality makes this independent of any index bookkeeping in the loss."""
    torch.manual_seed(0)
    tok = TokensTokenizer(7)  # symbols 0..6, pad 7, bos 8, eos 9
    assert tok.pad_id == PAD
    net = build_transformer(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=16).eval()
    cond = _Prefix(16)
    model = ARModel(net, tok, cond)
    batches = [
        {"ids": IDS[:2], "cond": torch.tensor([0, 1])},  # 5 + 3 targets
        {"ids": IDS[2:], "cond": torch.tensor([2])},  # 1 target: batch means would weight it 8x
    ]
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            prefix = cond(batch["cond"])
            for b, row in enumerate(batch["ids"]):
                for t, target in enumerate(row.tolist()):
                    if target == PAD:
                        continue
                    ctx = row[None, :t] if t else None
                    logits = net(ctx, prefix=prefix[b : b + 1])[0, -1]
                    total += _nll(logits, target)
                    n += 1
    m = dataset_nll(model, batches)
    assert m["tokens"] == n == 9
    assert m["nll"] == pytest.approx(total / n, rel=1e-5)
    assert m["bpt"] == pytest.approx(total / n / math.log(2), rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)


# ----------------------------------------------------------------------------- spatial metrics
def test_pearson_per_gene_known_values():
    pred = np.array([[1, 1, 1, 1, 5, 1], [2, 2, 0, 2, 5, 2], [3, 3, 1, 3, 5, 4]], dtype=float)
    true = np.array([[2, 3, 1, 4, 1, 1], [4, 2, 2, 4, 2, 3], [6, 1, 3, 4, 3, 2]], dtype=float)
    r = pearson_per_gene(pred, true)
    # g0: true = 2 pred -> 1; g1: reversed -> -1; g2: centred pred (1/3, -2/3, 1/3) . (-1, 0, 1) = 0;
    # g3: constant truth -> NaN (undefined); g4: constant prediction -> 0;
    # g5: centred (-4/3, -1/3, 5/3) . (-1, 1, 0) = 1, norms sqrt(42)/3 and sqrt(2) -> 3 / sqrt(84)
    np.testing.assert_allclose(r[[0, 1, 2, 4, 5]], [1.0, -1.0, 0.0, 0.0, 3 / math.sqrt(84)], atol=1e-12)
    assert np.isnan(r[3])


def test_interval_coverage_known_values():
    samples = np.broadcast_to(np.arange(11.0)[None, :, None], (2, 11, 3)).copy()  # [spots, K, genes]: 0..10
    true = np.array([[0.4, 0.5, 5.0], [9.5, 9.6, 10.0]])
    # level 0.9: the 5 % / 95 % quantiles of 0..10 are 0.5 and 9.5 -> 0.5, 5.0 and 9.5 are inside
    assert interval_coverage(samples, true, 0.9) == pytest.approx(3 / 6)
    # level 0.5: 2.5 and 7.5 -> only 5.0 is inside
    assert interval_coverage(samples, true, 0.5) == pytest.approx(1 / 6)
    # level 1.0: the full range 0..10 -> everything
    assert interval_coverage(samples, true, 1.0) == pytest.approx(1.0)


def test_ridge_baseline_recovers_a_linear_map_and_picks_alpha_by_cv():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 1))
    x = np.concatenate([z + 0.1 * rng.normal(size=(60, 1)), z + 0.1 * rng.normal(size=(60, 1))], 1)  # correlated
    w = np.array([[3.0, 0.5], [-2.0, 1.0]])  # y0 = 3 x0 - 2 x1 (a contrast), y1 = 0.5 x0 + x1
    y = x @ w + 10.0
    groups = np.repeat([0, 1, 2], 20)
    x_test = np.array([[0.0, 0.0], [1.0, -1.0], [-4.0, 3.0]])
    # a heavy penalty shrinks towards X^T y (the correlated direction) and loses the contrast y0:
    # leave-one-section-out CV must pick the light one, whatever the order of the candidates
    pred, info = ridge_baseline(x, y, groups, x_test, alphas=(1e6, 1e-6))
    assert info["alpha"] == 1e-6
    assert info["cv_pcc"]["1e-06"] == pytest.approx(1.0, abs=1e-6) and info["cv_pcc"]["1000000.0"] < 0.99  # ~0.96
    # noise-free linear data: the fit is exact; the third point's y0 = 3(-4) - 2(3) + 10 = -8 is clipped to 0
    np.testing.assert_allclose(pred, [[10.0, 10.0], [15.0, 9.5], [0.0, 11.0]], atol=1e-4)


# ----------------------------------------------------------------------------- music statistics
def _score(notes: list[tuple[int, int, int]], tpq: int = 480) -> Score:
    s = Score(tpq)
    s.tempos.append(Tempo(0, 120.0))
    tr = Track("v", 0, False)
    for t, d, p in notes:
        tr.notes.append(Note(t, d, p, 80))
    s.tracks.append(tr)
    return s


# onset (ticks), duration (ticks), pitch; 480 ticks per quarter, 120 per 16th
PIECE = [(0, 480, 60), (0, 960, 64), (480, 480, 67), (960, 240, 72)]


def test_piece_stats_known_values():
    st = piece_stats(_score(PIECE))
    # ends at 1200 ticks = 2.5 quarters; 4 distinct onsets -> 1.6 per quarter
    # 16th steps 0-7 hold two notes, steps 8-9 one: (8 * 2 + 2 * 1) / 10 = 1.8
    assert st == {"notes": 4, "note_density": pytest.approx(1.6), "polyphony": pytest.approx(1.8),
                  "pitch_range": 12.0}
    assert piece_stats(_score([])) == {"notes": 0, "note_density": 0.0, "polyphony": 0.0, "pitch_range": 0.0}


def test_compare_sets_known_values():
    ref = [_score([(0, 480, 60), (480, 480, 62)])]  # pitch classes C, D -> (0.5, 0.5)
    out = compare_sets([_score(PIECE)], ref)  # C, E, G, C -> C 0.5, E 0.25, G 0.25
    assert out["pitch_class_hist_l1"] == pytest.approx(0.0 + 0.5 + 0.25 + 0.25)
    # ref: 2 onsets over 2 quarters; one note at a time; range 2 semitones
    assert out["ref_note_density"] == pytest.approx(1.0) and out["ref_polyphony"] == pytest.approx(1.0)
    assert out["ref_pitch_range"] == 2.0 and out["sample_pitch_range"] == 12.0
    assert out["sample_polyphony"] == pytest.approx(1.8)
    two = compare_sets([_score(PIECE), _score([(0, 240, 61)])], ref)  # statistics: means over pieces
    assert two["sample_pitch_range"] == pytest.approx(6.0) and two["sample_notes"] == pytest.approx(2.5)
    # histograms are pooled over notes (C 2/5, C# E G 1/5 each), not averaged over pieces (which gives 1.5)
    assert two["pitch_class_hist_l1"] == pytest.approx(0.1 + 0.2 + 0.5 + 0.2 + 0.2)


def test_music_evaluator_reference_statistics_on_a_known_chorale(tmp_path):
    """The evaluator's reference side on a hand-written JSB validation piece."""
    nan = np.nan
    piece = np.array([[72, 67, 64, nan]] * 4 + [[72, 69, 64, 48]] * 4)  # [8 sixteenths, S A T B]
    rng = np.random.default_rng(0)
    train = np.array([rng.integers(50, 70, (16, 4)).astype(float) for _ in range(3)], dtype=object)
    path = tmp_path / "Jsb16thSeparated.npz"
    np.savez(path, train=train, valid=np.array([piece], dtype=object), test=np.array([piece], dtype=object))
    dm = JSBDataModule(str(path), window_steps=16, stride_steps=8)
    torch.manual_seed(0)
    net = build_transformer(vocab_size=dm.tokenizer.vocab_size, num_types=dm.tokenizer.num_types, n_layer=1,
                            n_head=2, d_model=16, max_seq_len=70)
    m = MusicEvaluator(num_samples=2, generation={"max_new_tokens": 16})(ARModel(net.eval(), dm.tokenizer), dm, tmp_path)
    # held notes: S 72 (8 steps), A 67 then 69 (4 + 4), T 64 (8), B 48 (last 4): 5 onsets in 2 quarters;
    # 3 voices sound in steps 0-3 and 4 in steps 4-7; range 72 - 48
    assert m["music/reference_pieces"] == 1 and m["music/ref_pieces"] == 1
    assert m["music/ref_note_density"] == pytest.approx(2.5)  # 5 onsets in 2 quarters
    assert m["music/ref_polyphony"] == pytest.approx(3.5)
    assert m["music/ref_pitch_range"] == 24.0
    assert m["music/ref_voice_crossing_per_100"] == 0.0 and m["music/ref_key_stability"] == 1.0  # one key, no crossing
    assert m["music/grammar_error_rate"] == 0.0 and m["music/num_samples"] == 2


# ----------------------------------------------------------------------------- image Fréchet distance
def _with_moments(rng, n: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """n points whose sample mean and sample covariance (ddof=1) are exactly ``mean`` and ``cov``."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: cov(z) = I
    return mean + z @ np.linalg.cholesky(cov).T


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    c = np.cos(0.6), np.sin(0.6)
    rot = np.array([[c[0], -c[1]], [c[1], c[0]]])
    s2 = rot @ np.diag([1.0, 9.0]) @ rot.T  # not diagonal: sqrtm(S1 S2) is needed, not elementwise roots
    a = _with_moments(rng, 500, np.array([0.0, 0.0]), 4.0 * np.eye(2))
    b = _with_moments(rng, 700, np.array([1.0, 2.0]), s2)
    # |mu1 - mu2|^2 = 5; tr S1 + tr S2 = 8 + 10; sqrt(S1 S2) = 2 sqrt(S2), trace 2 (1 + 3) = 8 -> 5 + 18 - 16
    assert frechet_distance(a, b) == pytest.approx(7.0, abs=1e-4)
    assert frechet_distance(b, a) == pytest.approx(7.0, abs=1e-4)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
