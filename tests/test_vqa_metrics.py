"""VQA scoring (eval/vqa_metrics.py) against hand-computed scores of the official benchmark definitions."""

from __future__ import annotations

import pytest

from eval.vqa_metrics import (
    METRICS,
    anls,
    extract_choice,
    levenshtein,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    relaxed_accuracy,
    score,
    vqa_accuracy,
)

# ------------------------------------------------------------------------------------------------ relaxed accuracy


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("12.5%", ["12.5"], 1.0),  # percent stripped, not divided by 100
        ("12.5", ["12.5%"], 1.0),
        ("1,234", ["1234"], 1.0),  # thousands comma
        ("$1,234.0", ["1234"], 1.0),
        ("104.9", ["100"], 1.0),  # 4.9 % off
        ("95.1", ["100"], 1.0),
        ("105.1", ["100"], 0.0),  # 5.1 % off
        ("94.9", ["100"], 0.0),
        ("105", ["100"], 1.0),  # exactly 5 % is inside
        ("0", ["0"], 1.0),  # zero target: exact only
        ("0.001", ["0"], 0.0),
        ("-0.5", ["-0.5"], 1.0),
        (" Yes. ", ["yes"], 1.0),  # text: case-insensitive, whitespace and trailing period stripped
        ("no", ["yes"], 0.0),
        ("Brazil", ["Argentina", "brazil"], 1.0),  # max over answers
        ("2019 sales", ["2019"], 0.0),  # not a number → exact text compare
        ("12", ["twelve"], 0.0),
    ],
)
def test_relaxed_accuracy(prediction: str, answers: list[str], expected: float) -> None:
    assert relaxed_accuracy(prediction, answers) == expected


def test_relaxed_accuracy_accepts_a_single_string_and_custom_tolerance() -> None:
    assert relaxed_accuracy("110", "100") == 0.0
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0


# ---------------------------------------------------------------------------------------------------------- ANLS


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_levenshtein(a: str, b: str, d: int) -> None:
    assert levenshtein(a, b) == d
    assert levenshtein(b, a) == d


def test_anls_exact_and_normalized() -> None:
    assert anls("Total  Revenue ", ["total revenue"]) == 1.0  # case and whitespace normalized
    assert anls("", [""]) == 1.0


def test_anls_partial_and_threshold() -> None:
    # 1 edit in 10 characters: NLD 0.1 → 0.9.
    assert anls("abcdefghij", ["abcdefghiX"]) == pytest.approx(0.9)
    # 4 edits in 10: NLD 0.4 → 0.6 (just under the threshold).
    assert anls("abcdefghij", ["abcdefWXYZ"]) == pytest.approx(0.6)
    # 5 edits in 10: NLD exactly 0.5 → 0 (the threshold excludes it).
    assert anls("abcdefghij", ["abcdeVWXYZ"]) == 0.0
    # 6 edits in 10: NLD 0.6 → 0.
    assert anls("abcdefghij", ["abcdUVWXYZ"]) == 0.0
    # "kitten" vs "sitting": 3 / 7 < 0.5 → 4/7.
    assert anls("kitten", "sitting") == pytest.approx(4 / 7)


def test_anls_max_over_answers_and_custom_threshold() -> None:
    assert anls("abcdefghij", ["zzzz", "abcdefghiX", "abcdefWXYZ"]) == pytest.approx(0.9)
    assert anls("abcdefghij", ["abcdefWXYZ"], threshold=0.3) == 0.0


# --------------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A Red Car", "red car"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("dont know", "don't know"),
        ("yes!", "yes"),
        ("black-and-white", "black and white"),
        ("  ten\n", "10"),
    ],
)
def test_normalize_vqa_answer(raw: str, normalized: str) -> None:
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(("k", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(k: int, expected: float) -> None:
    answers = ["dog"] * k + ["cat"] * (10 - k)
    assert vqa_accuracy("dog", answers) == pytest.approx(expected)


def test_vqa_accuracy_leave_one_out_formula_by_hand() -> None:
    # 10 answers, 2 match: the 2 matching subsets see 1 match (1/3), the 8 others see 2 (2/3) → (2/3 + 16/3) / 10.
    assert vqa_accuracy("2", ["two", "2"] + ["3"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # 5 answers, 1 match: 1 subset sees 0, 4 see 1 → (4/3) / 5.
    assert vqa_accuracy("dog", ["dog", "cat", "cat", "cat", "cat"]) == pytest.approx((4 / 3) / 5)
    # 3 answers, all match: each subset sees 2 → 2/3.
    assert vqa_accuracy("dog", ["dog", "dog", "dog"]) == pytest.approx(2 / 3)


def test_vqa_accuracy_normalizes_both_sides() -> None:
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("the dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("The Dog", ["a dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dog", "dog") == 1.0  # single answer: plain match
    assert vqa_accuracy("cat", "dog") == 0.0


# ------------------------------------------------------------------------------------------------ multiple choice

CHOICES = ["a cat", "a dog", "a bird", "a fish"]


@pytest.mark.parametrize(
    "prediction",
    [
        "B",
        "b",
        "(B)",
        "B.",
        "B)",
        " B: ",
        "B. a dog",
        "(B) a dog",
        "The answer is B",
        "The answer is (B).",
        "Answer: B",
        "I choose option B because it barks.",
        "a dog",
        "A dog.",
        "It is clearly a dog in the picture",
    ],
)
def test_mc_extracts_letter_variants(prediction: str) -> None:
    assert extract_choice(prediction, CHOICES) == "B"
    assert multiple_choice_accuracy(prediction, CHOICES, "B") == 1.0
    assert multiple_choice_accuracy(prediction, CHOICES, 1) == 1.0  # AI2D-style index
    assert multiple_choice_accuracy(prediction, CHOICES, "a dog") == 1.0  # option text


@pytest.mark.parametrize("prediction", ["C", "(A)", "The answer is D", "a fish", "E", "I don't know", ""])
def test_mc_wrong_or_unextractable(prediction: str) -> None:
    assert multiple_choice_accuracy(prediction, CHOICES, "B") == 0.0


def test_mc_letter_out_of_range_and_ambiguity() -> None:
    assert extract_choice("E", CHOICES) is None  # only A-D exist
    assert extract_choice("a cat or a dog", CHOICES) is None  # two options named, same length
    assert extract_choice("the answer is a dog", CHOICES) == "B"  # lowercase "a" is an article, not option A
    assert extract_choice("C", []) == "C"  # no choice texts: any letter


def test_mc_bad_reference_raises() -> None:
    with pytest.raises(ValueError, match="neither"):
        multiple_choice_accuracy("B", CHOICES, "a horse")


# ---------------------------------------------------------------------------------------------- registry / score


def test_registry_names() -> None:
    assert set(METRICS) == {"relaxed_accuracy", "anls", "vqa_accuracy", "mc_accuracy"}
    assert METRICS["mc_accuracy"] is multiple_choice_accuracy


def test_score_averages() -> None:
    assert score("relaxed_accuracy", ["12.5%", "105.1", "yes"], [["12.5"], ["100"], ["Yes"]]) == pytest.approx(2 / 3)
    assert score("anls", ["abcdefghij", "abcdefghij"], [["abcdefghiX"], ["abcdefWXYZ"]]) == pytest.approx(0.75)
    refs = [["dog"] * 1 + ["cat"] * 9, ["dog"] * 3 + ["cat"] * 7]
    assert score("vqa_accuracy", ["dog", "dog"], refs) == pytest.approx(0.6)
    mc_refs = [{"choices": CHOICES, "answer": "B"}, (CHOICES, 2), {"choices": CHOICES, "answer": "A"}, (CHOICES, "D")]
    assert score("mc_accuracy", ["B", "(C)", "The answer is D", "a fish"], mc_refs) == pytest.approx(0.75)


def test_score_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown metric 'anl'.*Did you mean 'anls'"):
        score("anl", ["x"], [["x"]])
    with pytest.raises(ValueError, match="Did you mean 'vqa_accuracy'"):
        score("vqa_acc", ["x"], [["x"]])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("anls", ["x", "y"], [["x"]])
    with pytest.raises(ValueError, match="empty"):
        score("anls", [], [])
