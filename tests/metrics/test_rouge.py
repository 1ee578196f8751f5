import math

import pytest

from lmsmith.metrics.rouge import by_length, length_bucket, rouge_l


def test_identical_and_disjoint():
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(100.0)
    assert rouge_l("dog runs", "the cat sat") == 0.0


def test_hand_computed_lcs():
    # pred: a b c d (4), ref: a x c d e (5); LCS = a c d (3): P = 3/4, R = 3/5.
    p, r = 3 / 4, 3 / 5
    assert rouge_l("a b c d", "a x c d e") == pytest.approx(100 * 2 * p * r / (p + r))


def test_stemming_and_max_over_references():
    # "running" and "runs" both stem to "run"
    assert rouge_l("running fast", "runs fast") == pytest.approx(100.0)
    assert rouge_l("blue sky", ["green grass", "the blue sky"]) == pytest.approx(100 * 0.8)


def test_length_buckets():
    assert [length_bucket(n) for n in (0, 16, 17, 64, 65, 128, 129, 999)] == [
        "<=16",
        "<=16",
        "17-32",
        "33-64",
        "65-128",
        "65-128",
        ">128",
        ">128",
    ]
    table = by_length([10.0, 20.0, 30.0], [5, 7, 200])
    assert table["<=16"] == {"n": 2, "rougeL": 15.0}
    assert table[">128"]["rougeL"] == 30.0 and math.isnan(table["17-32"]["rougeL"])
