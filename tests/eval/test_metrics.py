"""Tests for qwenvl.eval.metrics: every expected number is worked out by hand in the test."""

from __future__ import annotations

import math

import pytest

from qwenvl.eval.metrics import (
    cider,
    exact_match,
    grounding_accuracy,
    grounding_iou,
    normalize_vqa_answer,
    ptb_tokenize,
    relaxed_correctness,
    vqa_accuracy,
    vqa_score,
)
from qwenvl.grounding import Box

# --------------------------------------------------------------------------------------------------------
# Grounding accuracy
# --------------------------------------------------------------------------------------------------------


def test_grounding_accuracy_perfect() -> None:
    targets = [(0, 0, 10, 10), (5, 5, 20, 30)]
    assert grounding_accuracy(targets, targets) == 1.0


def test_grounding_accuracy_hand_case() -> None:
    target = (0, 0, 10, 10)
    predictions = [
        Box(0, 0, 10, 10),  # IoU 1
        (5, 5, 15, 15),  # IoU 25 / 175 = 0.142857 -> miss
        None,  # no box parsed -> miss
        (0, 0, 5, 10),  # IoU 50 / 100 = 0.5 -> hit (>= threshold)
    ]
    assert grounding_accuracy(predictions, [target] * 4) == 2 / 4
    assert grounding_accuracy(predictions, [target] * 4, threshold=0.1) == 3 / 4


def test_grounding_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        grounding_accuracy([None], [])
    with pytest.raises(ValueError):
        grounding_accuracy([], [])


# --------------------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),  # period stripped (not before a digit), lowercased, number word -> digit
        ("the dog's", "dog's"),  # article removed; "'" is not in the punctuation list
        ("dont", "don't"),  # contractions table
        ("None", "0"),  # manual map
        ("1,000", "1000"),  # a digit,digit comma makes every mark vanish instead of becoming a space
        ("Yes, it is", "yes it is"),  # ", " touches a space -> removed
        ("a,b", "b"),  # no space, no digits -> "a b" -> article "a" dropped
        ("2.5", "2.5"),  # a period before a digit stays
        ("e.g. test", "eg test"),
        ("  The\tCat!\n", "cat"),
        ("t-shirt", "t shirt"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize(
    ("n_match", "expected"),
    [
        # Leave out each of the 10 annotators; k matches among the other 9 score min(1, k/3).
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # = 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = (2/3 + 16/3) / 10 = 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # = 0.9
        (4, (4 * 1 + 6 * 1) / 10),  # = 1.0
    ],
)
def test_vqa_accuracy_leave_one_out(n_match: int, expected: float) -> None:
    answers = ["2"] * n_match + ["3"] * (10 - n_match)
    assert vqa_accuracy("Two.", answers) == pytest.approx(expected, abs=1e-15)


def test_vqa_accuracy_two_of_ten_is_exactly_point_six() -> None:
    assert vqa_accuracy("dog", ["dog", "dog"] + ["cat"] * 8) == pytest.approx(0.6, abs=1e-15)


def test_vqa_accuracy_ground_truth_processing_follows_vqa_eval() -> None:
    # Answers disagree -> they get the punctuation step: "t-shirt" -> "t shirt", matching the prediction.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 1.0
    # All answers identical -> left untouched (the annotation files are already normalized), so the
    # normalized prediction "t shirt" does not equal "t-shirt". This is the official behaviour.
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0


def test_vqa_score_is_percent() -> None:
    gts = [["2"] * 10, ["dog", "dog"] + ["cat"] * 8]
    assert vqa_score(["two", "dog"], gts) == pytest.approx(100 * (1.0 + 0.6) / 2, abs=1e-12)  # 80.0
    assert vqa_score(["2", "cat"], gts) == 100.0
    with pytest.raises(ValueError):
        vqa_score(["a"], [])
    with pytest.raises(ValueError):
        vqa_accuracy("a", [])


def test_exact_match_and_relaxed() -> None:
    assert exact_match(" Yes ", "yes") == 1.0
    assert exact_match("no", ["yes", "No"]) == 1.0
    assert exact_match("maybe", ["yes", "no"]) == 0.0
    assert relaxed_correctness("104", "100")  # |104 - 100| / 100 = 0.04 <= 0.05
    assert not relaxed_correctness("106", "100")  # 0.06
    assert relaxed_correctness("12%", "0.12")  # "12%" reads as 0.12
    assert relaxed_correctness("Paris", "paris")
    assert not relaxed_correctness("0.1", "0")  # zero target: exact string match only


# --------------------------------------------------------------------------------------------------------
# CIDEr (pycocoevalcap's Cider = CIDEr-D)
# --------------------------------------------------------------------------------------------------------


def test_ptb_tokenize() -> None:
    assert ptb_tokenize("A man's hat, (red).") == ["a", "man", "'s", "hat", "red"]
    assert ptb_tokenize('Don\'t "stop"! A t-shirt costs 1,000 in the U.S.') == [
        "do", "n't", "stop", "a", "t-shirt", "costs", "1,000", "in", "the", "u.s.",
    ]  # fmt: skip


def test_cider_single_image_corpus_is_zero() -> None:
    # idf = log(#images) - log(df) = log(1) - log(1) = 0 for every n-gram: all vectors vanish.
    score, per_id = cider({"a": "a cat sat"}, {"a": ["a cat sat"]})
    assert score == 0.0 and per_id == {"a": 0.0}


def test_cider_two_image_perfect_two_word_captions() -> None:
    # No n-gram is shared between images, so every idf is log(2) and every cosine is 1 for orders 1 and 2;
    # 2-word captions have no 3-/4-grams (those orders give 0): 10 * (1 + 1 + 0 + 0) / 4 = 5.
    score, per_id = cider({1: "cat sat", 2: "dog ran"}, {1: ["cat sat"], 2: ["dog ran"]})
    assert per_id == {1: pytest.approx(5.0, abs=1e-12), 2: pytest.approx(5.0, abs=1e-12)}
    assert score == pytest.approx(5.0, abs=1e-12)


def test_cider_two_image_hand_case_with_clipping_idf_and_length_penalty() -> None:
    # Corpus: image 1 refs ["cat sat"], image 2 refs ["dog sat"]; L = log(2).
    # df: cat 1, dog 1, sat 2, "cat sat" 1, "dog sat" 1 -> idf: cat L, dog L, sat L - log 2 = 0, bigrams L;
    # "cat cat" appears in no reference: idf L - log(max(1, 0)) = L.
    # Image 1, candidate "cat cat sat":
    #   unigrams: cat 2L, sat 0 -> norm 2L ; ref: cat L, sat 0 -> norm L
    #   clipped dot = min(2L, L) * L = L^2 -> order-1 cosine L^2 / (2L * L) = 1/2 (1 without clipping)
    #   bigrams: "cat cat" L, "cat sat" L -> norm sqrt(2) L ; ref "cat sat" L -> norm L
    #   dot = min(L, 0) * 0 + min(L, L) * L = L^2 -> cosine 1/sqrt(2)
    #   lengths (bigram counts): 2 vs 1 -> penalty exp(-1^2 / (2 * 6^2)) = exp(-1/72)
    #   score = 10 * (1/2 + 1/sqrt(2) + 0 + 0) * exp(-1/72) / 4
    # Image 2, candidate "dog sat" == reference: cosines 1, 1 (sat weighs 0 on both sides) -> 10 * 2 / 4 = 5
    score1 = 10 * (0.5 + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4  # = 2.97614...
    score, per_id = cider({1: "cat cat sat", 2: "dog sat"}, {1: ["cat sat"], 2: ["dog sat"]})
    assert per_id[1] == pytest.approx(score1, rel=1e-12)
    assert per_id[2] == pytest.approx(5.0, rel=1e-12)
    assert score == pytest.approx((score1 + 5.0) / 2, rel=1e-12)


def test_cider_averages_over_references_and_skips_zero_norms() -> None:
    # Image 1 refs ["cat sat", "dog ran"], image 2 refs ["bird flew"]: no shared n-grams, all idf L.
    # Image 1, "cat sat": cosines [1, 1, 0, 0] vs the first ref, [0, 0, 0, 0] vs the second;
    #   10 * mean([1, 1, 0, 0]) / 2 refs = 10 * 0.5 / 2 = 2.5
    # Image 2, "bird": unigram cosine L^2 / (L * sqrt(2) L) = 1/sqrt(2); no bigrams (norm 0, no division);
    #   lengths 0 vs 1 bigram -> exp(-1/72); score = 10 * (1/sqrt(2)) * exp(-1/72) / 4
    score2 = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    score, per_id = cider({1: "cat sat", 2: "bird"}, {1: ["cat sat", "dog ran"], 2: ["bird flew"]})
    assert per_id[1] == pytest.approx(2.5, rel=1e-12)
    assert per_id[2] == pytest.approx(score2, rel=1e-12)
    assert score == pytest.approx((2.5 + score2) / 2, rel=1e-12)


def test_cider_tokenizes_case_and_punctuation_away() -> None:
    plain = cider({1: "cat cat sat", 2: "dog sat"}, {1: ["cat sat"], 2: ["dog sat"]}, tokenize=False)
    messy = cider({1: "Cat, cat sat.", 2: "DOG sat!"}, {1: ["A cat sat."], 2: ["A dog sat..."]})
    # After tokenization: candidates "cat cat sat" / "dog sat", refs "a cat sat" / "a dog sat"; L = log(2).
    # "a" and "sat" appear in both images' refs: idf 0. Every other n-gram has idf L.
    # Image 1: unigrams as in the hand case above -> 1/2. Bigrams: candidate "cat cat" L, "cat sat" L
    #   (norm sqrt(2) L) vs ref "a cat" L, "cat sat" L (norm sqrt(2) L): dot L^2 -> 1/2 (was 1/sqrt(2)).
    #   Trigrams: "cat cat sat" vs "a cat sat": no common one -> 0. Lengths 2 vs 2 bigrams: penalty 1.
    score1 = 10 * (0.5 + 0.5 + 0 + 0) / 4  # = 2.5
    assert messy[1][1] != plain[1][1]
    assert messy[1][1] == pytest.approx(score1, rel=1e-12)
    # Image 2 unigrams: "dog" L, "sat" 0 vs ref "a" 0, "dog" L, "sat" 0 -> cosine 1;
    # bigrams: "dog sat" L vs ref "a dog" L, "dog sat" L -> L^2 / (L * sqrt(2) L) = 1/sqrt(2);
    # no candidate trigram (norm 0) -> 0; lengths 1 vs 2 bigrams -> exp(-1/72).
    assert messy[1][2] == pytest.approx(10 * (1 + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4, rel=1e-12)


def test_cider_rejects_mismatched_ids_and_empty_refs() -> None:
    with pytest.raises(ValueError):
        cider({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError):
        cider({1: "a"}, {1: []})
    with pytest.raises(ValueError):
        cider({}, {})


def test_grounding_accuracy_reversed_prediction_is_a_miss_as_in_the_official_eval() -> None:
    # torchvision's box_iou (the official refcoco eval) finds no intersection for x2 < x1 or y2 < y1
    target = (0, 0, 10, 10)
    assert grounding_accuracy([(10, 10, 0, 0)], [target]) == 0.0
    assert grounding_accuracy([(10, 0, 0, 10)], [target]) == 0.0
    assert grounding_iou((10, 10, 0, 0), target) == 0.0 and grounding_iou((0, 0, 10, 10), target) == 1.0


def test_vqa_contraction_table_is_the_official_one() -> None:
    # vqaEval.py maps all three spellings of 'ow's'at to "'ow's'at"; the third one was mapped to itself
    assert normalize_vqa_answer("'ow'sat") == "'ow's'at"
    assert vqa_accuracy("'ow'sat", ["'ow's'at"] * 10) == 1.0


def test_relaxed_correctness_strips_every_percent_sign_as_chartqa() -> None:
    # ChartQA / Pix2Struct's _to_float: float(text.rstrip("%")) / 100
    assert relaxed_correctness("0.5", "50%%")
    assert relaxed_correctness("50%%", "0.5")
