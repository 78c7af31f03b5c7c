"""Confidence measures on hand-made logits / hidden states with hand-computed values, and CALM's
decaying threshold against its published formula evaluated by hand."""

import math

import pytest
import torch

from megatron.text_generation.confidence import MEASURES, check_measure, confidence, decayed_threshold

# Row 0: p = (0.5, 0.25, 0.25); row 1: uniform over 3; row 2: p = (1, 0, 0) (two banned tokens at -inf).
LOGITS = torch.tensor([[math.log(2.0), 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, float("-inf"), float("-inf")]])


def test_measures_tuple():
    assert MEASURES == ("top1", "margin", "entropy", "cosine", "estimator")


def test_top1_is_max_probability():
    assert torch.allclose(confidence("top1", LOGITS), torch.tensor([0.5, 1 / 3, 1.0]))


def test_margin_is_top1_minus_top2():
    assert torch.allclose(confidence("margin", LOGITS), torch.tensor([0.25, 0.0, 1.0]), atol=1e-7)


def test_entropy_is_one_minus_normalised_entropy():
    # H(0.5, 0.25, 0.25) = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2; normalised by ln 3
    expected = torch.tensor([1 - 1.5 * math.log(2) / math.log(3), 0.0, 1.0])
    got = confidence("entropy", LOGITS)
    assert not torch.isnan(got).any()
    assert torch.allclose(got, expected, atol=1e-6)


def test_temperature_divides_logits():
    # logits (ln 4, 0) at temperature 2 -> (ln 2, 0): p = (2/3, 1/3)
    x = torch.tensor([[math.log(4.0), 0.0]])
    assert torch.allclose(confidence("top1", x, temperature=2.0), torch.tensor([2 / 3]))
    assert torch.allclose(confidence("margin", x, temperature=2.0), torch.tensor([1 / 3]))
    with pytest.raises(ValueError, match="temperature"):
        confidence("top1", x, temperature=0.0)


def test_cosine_between_consecutive_exits():
    prev = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    cur = torch.tensor([[2.0, 0.0], [0.0, 1.0], [4.0, 3.0], [-1.0, -1.0]])
    got = confidence("cosine", torch.zeros(4, 5), prev_hidden=prev, hidden=cur)
    # parallel 1, orthogonal 0, (12 + 12) / 25, opposite -1 -> clipped to 0
    assert torch.allclose(got, torch.tensor([1.0, 0.0, 24 / 25, 0.0]))


def test_cosine_without_previous_exit_is_zero():
    got = confidence("cosine", torch.zeros(2, 5), hidden=torch.ones(2, 3))
    assert torch.equal(got, torch.zeros(2))
    with pytest.raises(ValueError, match="hidden"):
        confidence("cosine", torch.zeros(2, 5))
    with pytest.raises(ValueError, match="same shape"):
        confidence("cosine", torch.zeros(2, 5), prev_hidden=torch.ones(2, 4), hidden=torch.ones(2, 3))


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"confidence: unknown measure 'max'.*top1, margin, entropy, cosine"):
        confidence("max", LOGITS)
    with pytest.raises(ValueError, match="confidence: unknown"):
        check_measure("softmax")
    with pytest.raises(ValueError, match=r"logits must be \[b, V\]"):
        confidence("top1", torch.zeros(2, 3, 4))


def test_single_token_vocabulary_is_certain():
    x = torch.zeros(2, 1)
    for m in ("top1", "margin", "entropy"):
        assert torch.equal(confidence(m, x), torch.ones(2))


def test_every_measure_lies_in_unit_interval():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 11, generator=g) * 5
    h0, h1 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    for m in MEASURES:
        c = confidence(m, x, prev_hidden=h0, hidden=h1)
        assert c.shape == (16,) and bool(((c >= 0) & (c <= 1)).all()), m


def test_decayed_threshold_follows_calm_eq5():
    # t = 0: 0.9 * 0.8 + 0.1 = 0.82; t = N / 2, tau = 2: 0.72 + 0.1 e^-1
    assert decayed_threshold(0.8, 0, 10, 2.0) == pytest.approx(0.82)
    assert decayed_threshold(0.8, 5, 10, 2.0) == pytest.approx(0.72 + 0.1 * math.exp(-1.0))
    assert decayed_threshold(0.8, 10, 10, 0.0) == pytest.approx(0.82)  # tau 0: no decay
    assert decayed_threshold(1.0, 0, 10, 1.0) == 1.0  # clipped to [0, 1]
    got = decayed_threshold(0.5, torch.tensor([0, 4, 8]), 8, 4.0)
    assert torch.allclose(got, torch.tensor([0.55, 0.45 + 0.1 * math.exp(-2.0), 0.45 + 0.1 * math.exp(-4.0)]))


def test_decayed_threshold_is_non_increasing():
    values = [decayed_threshold(0.7, t, 20, 3.0) for t in range(21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_decayed_threshold_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_len"):
        decayed_threshold(0.5, 0, 0, 1.0)
    with pytest.raises(ValueError, match="decay"):
        decayed_threshold(0.5, 0, 4, -1.0)
    with pytest.raises(ValueError, match="position"):
        decayed_threshold(0.5, -1, 4, 1.0)
    with pytest.raises(ValueError, match="positions"):
        decayed_threshold(0.5, torch.tensor([1, -1]), 4, 1.0)
