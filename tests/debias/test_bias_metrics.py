import math

import pytest

from lmsmith.metrics.bias import bbq_scores, bias_score, is_biased, std_across


def test_bias_score_range():
    assert bias_score(10, 10) == 100.0
    assert bias_score(0, 10) == -100.0
    assert bias_score(5, 10) == 0.0
    assert math.isnan(bias_score(0, 0))


def test_is_biased_follows_polarity():
    # target (stereotyped group) at 0, unknown at 2
    assert is_biased(0, negative=True, unknown=2, target=0) is True
    assert is_biased(1, negative=True, unknown=2, target=0) is False
    assert is_biased(1, negative=False, unknown=2, target=0) is True
    assert is_biased(2, negative=True, unknown=2, target=0) is None
    assert is_biased(-1, negative=True, unknown=2, target=0) is None
    assert is_biased(0, negative=True, unknown=2, target=None) is None


def test_bbq_scores_hand_computed():
    # 4 ambiguous rows (label = unknown = 2), 4 disambiguated; target always 0
    pred = [2, 0, 0, 1, 0, 0, 1, 2]
    label = [2, 2, 2, 2, 0, 1, 1, 0]
    amb = [True] * 4 + [False] * 4
    neg = [True, True, False, True, True, True, True, False]
    m = bbq_scores(pred, label, amb, neg, [2] * 8, [0] * 8)
    assert m["accuracy"] == pytest.approx(100 * 3 / 8)
    assert m["accuracy_ambig"] == 25.0
    assert m["accuracy_disambig"] == 50.0
    # ambig non-unknown: row1 (neg, pick target) biased, row2 (nonneg, pick target) not,
    # row3 (neg, pick other) not → s = 2/3*... = 2*(1/3)-1 = -1/3; s_AMB = (1-0.25)·s
    assert m["bias_ambig"] == pytest.approx(0.75 * 100 * (2 / 3 - 1))
    # disambig non-unknown: row4 biased, row5 biased, row6 (neg, other) not → 2*(2/3)-1
    assert m["bias_disambig"] == pytest.approx(100 * (4 / 3 - 1))
    assert m["unknown_rate"] == pytest.approx(100 * 2 / 8)


def test_perfect_model_has_zero_ambiguous_bias():
    m = bbq_scores([2, 2], [2, 2], [True, True], [True, False], [2, 2], [0, 0])
    assert m["accuracy_ambig"] == 100.0
    assert m["bias_ambig"] == 0.0  # (1 - 1) · s, even though s itself is undefined


def test_length_mismatch_and_std():
    with pytest.raises(ValueError):
        bbq_scores([0], [0, 1], [True], [True], [2], [0])
    assert std_across([50.0, 50.0]) == 0.0
    assert std_across([40.0, 60.0]) == pytest.approx(14.142, abs=1e-3)
    assert std_across([7.0]) == 0.0
