import math

import pytest

from lmsmith.metrics.qa import (
    exact_match,
    normalize_answer,
    reply_scores,
    sacrebleu_corpus,
    squad_scores,
    token_f1,
)


def test_normalize_drops_case_punctuation_articles():
    assert normalize_answer("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert normalize_answer("an apple") == "apple"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_max_over_references():
    assert exact_match("the Eiffel Tower.", ["Eiffel tower", "Paris"]) == 100.0
    assert exact_match("Paris, France", ["Eiffel tower", "Paris"]) == 0.0


def test_token_f1_hand_computed():
    # pred tokens: new york city ; ref: york city hall -> common 2, P = 2/3, R = 2/3
    assert token_f1("New York City", "York City Hall") == pytest.approx(100 * 2 / 3)
    # pred "a b b" vs ref "b b c": common = min counts: b:2 -> P = 2/3, R = 2/3
    assert token_f1("x y y", "y y z") == pytest.approx(100 * 2 / 3)
    # P = 1/4, R = 1/1 -> F1 = 2 * 0.25 / 1.25 = 0.4
    assert token_f1("one two three four", "four") == pytest.approx(40.0)
    assert token_f1("nothing shared", "at all") == 0.0


def test_token_f1_max_and_empty_rules():
    assert token_f1("four", ["one two three four", "four"]) == 100.0
    assert token_f1("", "") == 100.0  # both empty after normalisation
    assert token_f1("the", "cat") == 0.0  # "the" normalises to empty
    with pytest.raises(ValueError):
        token_f1("x", [])


def test_squad_scores_means():
    s = squad_scores(["cat", "dog house"], [["the cat"], ["dog"]])
    assert s["em"] == pytest.approx(50.0)
    assert s["f1"] == pytest.approx((100 + 100 * 2 / 3) / 2)
    assert s["n"] == 2
    assert math.isnan(squad_scores([], [])["f1"])


def test_sacrebleu_perfect_and_disjoint():
    refs = [["the quick brown fox jumps over the lazy dog"], ["hello there my good friend"]]
    preds = [r[0] for r in refs]
    assert sacrebleu_corpus(preds, refs) == pytest.approx(100.0)
    assert sacrebleu_corpus(["zz yy", "qq"], refs) == pytest.approx(0.0)
    # a second reference slot that matches still gives 100
    assert sacrebleu_corpus(["a b c d e"], [["x y", "a b c d e"]]) == pytest.approx(100.0)


def test_reply_scores_sum_is_the_three():
    refs = [["the quick brown fox jumps over the lazy dog"]]
    s = reply_scores(["quick brown fox"], refs)
    assert s["sum_no_meteor"] == pytest.approx(s["f1"] + s["sacrebleu"] + s["rougeL"])
    assert s["f1"] == pytest.approx(100 * 2 * (3 / 3) * (3 / 7) / (1 + 3 / 7))
