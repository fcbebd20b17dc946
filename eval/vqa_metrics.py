"""Scoring of labelled visual-question-answering sets, as the official benchmark scorers (and lmms-eval) define it.

Four per-item metrics, each returning a float in [0, 1]:

* :func:`relaxed_accuracy` — ChartQA (PlotQA-style relaxed correctness).
* :func:`anls` — DocVQA / InfoVQA (Average Normalized Levenshtein Similarity).
* :func:`vqa_accuracy` — VQAv2 / TextVQA / VizWiz (the official leave-one-out human-agreement accuracy).
* :func:`multiple_choice_accuracy` — AI2D / MMBench / MMMU / ScienceQA (option-letter extraction + exact compare).

:data:`METRICS` maps a metric name to its function and :func:`score` averages one metric over a data set.
This is our own implementation of the published definitions; no scorer code is copied.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "METRICS",
    "anls",
    "extract_choice",
    "levenshtein",
    "multiple_choice_accuracy",
    "normalize_vqa_answer",
    "relaxed_accuracy",
    "score",
    "vqa_accuracy",
]


def _as_list(answers: str | Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    out = [str(a) for a in answers]
    if not out:
        raise ValueError("at least one reference answer is required")
    return out


# --------------------------------------------------------------------------------------------------------- ChartQA

_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _to_number(text: str) -> float | None:
    """``"12.5%"`` → 12.5, ``"$1,234"`` → 1234.0, ``"abc"`` → None (the whole string must be one number)."""
    t = text.strip().rstrip(".").strip()
    t = t.replace("%", "").replace("$", "").replace(",", "").strip()
    if not _NUMBER_RE.fullmatch(t):
        return None
    return float(t)


def _relaxed_one(prediction: str, target: str, tolerance: float) -> float:
    pred_num, target_num = _to_number(prediction), _to_number(target)
    if pred_num is not None and target_num is not None:
        if target_num == 0.0:
            return float(pred_num == 0.0)
        # Tiny epsilon so that an exactly-5%-off answer is not lost to float rounding (e.g. 105 vs 100).
        return float(abs(pred_num - target_num) / abs(target_num) <= tolerance + 1e-9)

    def norm(s: str) -> str:
        return s.strip().rstrip(".").strip().lower()

    return float(norm(prediction) == norm(target))


def relaxed_accuracy(prediction: str, answers: str | Sequence[str], *, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Methani et al. 2020; ChartQA, Masry et al. 2022; lmms-eval ``relaxed_correctness``).

    Normalization: surrounding whitespace and a trailing period are stripped. If both prediction and reference
    parse as a number once ``%``, ``$`` and thousands commas are removed (``"12.5%"`` → 12.5, ``"1,234"`` → 1234),
    the item is correct when ``|pred − target| / |target| ≤ tolerance`` (5 %); a target of 0 needs an exact 0.
    Otherwise the strings are compared case-insensitively for exact equality.

    Score = max over the reference answers of the 0/1 correctness.
    """
    return max(_relaxed_one(prediction, a, tolerance) for a in _as_list(answers))


# ------------------------------------------------------------------------------------------------- DocVQA / ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.lower().split())


def anls(prediction: str, answers: str | Sequence[str], *, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one item (DocVQA, InfoVQA; Biten et al. 2019, ST-VQA).

    Normalization: lower-case, strip, collapse runs of whitespace to one space.
    NLD = Levenshtein(pred, ans) / max(len(pred), len(ans)) (0 when both are empty);
    similarity = 1 − NLD if NLD < threshold (0.5) else 0.

    Score = max over the reference answers; the data-set ANLS is the mean over questions.
    """
    pred = _anls_normalize(prediction)
    best = 0.0
    for answer in _as_list(answers):
        ans = _anls_normalize(answer)
        longest = max(len(pred), len(ans))
        nld = levenshtein(pred, ans) / longest if longest else 0.0
        best = max(best, 1.0 - nld if nld < threshold else 0.0)
    return best


# ----------------------------------------------------------------------------------------------- VQAv2 / TextVQA

# Punctuation the official VQA evaluation handles (the apostrophe is kept for contractions, the period separately).
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern "(?!<=\d)(\.)(?!\d)" effectively removes every period not followed by a digit.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_DIGIT_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Subset of the official contractions table: apostrophe-less spellings → the canonical form.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hes": "he's",
    "im": "i'm",
    "isnt": "isn't",
    "itd": "it'd",
    "itll": "it'll",
    "ive": "i've",
    "lets": "let's",
    "shouldnt": "shouldn't",
    "shes": "she's",
    "thats": "that's",
    "theres": "there's",
    "theyre": "they're",
    "theyve": "they've",
    "wasnt": "wasn't",
    "werent": "weren't",
    "whats": "what's",
    "wheres": "where's",
    "whos": "who's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "youre": "you're",
    "youve": "you've",
}


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalization (VQA ``vqaEval.py`` / lmms-eval ``EvalAIAnswerProcessor``).

    1. newlines/tabs → spaces, strip, lower-case;
    2. punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space (or the text
       has a digit-comma-digit number, so ``1,000`` → ``1000``), otherwise replaced by a space;
       a period not followed by a digit is deleted (``"dog."`` → ``"dog"``, ``"2.5"`` kept);
    3. number words zero…ten (and "none") → digits, articles a/an/the dropped, apostrophe-less contractions
       restored (``"dont"`` → ``"don't"``; a documented subset of the official table).
    """
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        touches_space = p + " " in text or " " + p in text
        out = out.replace(p, "" if touches_space or has_digit_comma else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for word in out.split():
        word = _DIGIT_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy (VQAv2, TextVQA, VizWiz; Antol et al. 2015, official ``vqaEval.py``).

    Prediction and every human answer are normalized with :func:`normalize_vqa_answer`. For each of the n
    human answers (usually 10), leave it out and score ``min(#other answers equal to the prediction / 3, 1)``;
    the accuracy is the mean over the n leave-one-out subsets. With 10 answers of which k match the prediction
    this gives 0.3, 0.6, 0.9 and 1.0 for k = 1, 2, 3 and ≥ 4. Fewer than 10 answers use the same formula;
    a single answer is scored by plain exact match (there is no subset to leave it out of).
    """
    gts = [normalize_vqa_answer(a) for a in _as_list(answers)]
    pred = normalize_vqa_answer(prediction)
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = [gt == pred for gt in gts]
    total_matching = sum(matches)
    accs = [min(1.0, (total_matching - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


# -------------------------------------------------------------------------------------------- multiple choice

_LETTERS = string.ascii_uppercase
_BARE_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?\s*[.:)]?$")
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|[.:])\s")
# The phrase is case-insensitive, the letter must be a capital ("the answer is a dog" picks no letter).
_ANSWER_PHRASE = re.compile(
    r"(?i:\b(?:answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be))?)\s*[:\-]?\s*\(?\s*([A-Z])\b(?!['’])"
)
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z'’])\(?([A-Z])\)?(?![A-Za-z'’])")


def _norm_text(s: str) -> str:
    return " ".join(s.strip().strip(".").lower().split())


def extract_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a free-form answer picks, or None.

    Tried in order: a bare letter (``"B"``, ``"(B)"``, ``"b."``); a leading ``"B. …"`` / ``"(B) …"``; a phrase
    ``"answer is B"`` / ``"Answer: (B)"`` / ``"option B"``; the text of exactly one option (equal to the whole
    answer, else contained in it — the longest contained option wins); one distinct standalone capital letter.
    Letters beyond the number of choices are ignored (all of A–Z when ``choices`` is empty).
    """
    valid = _LETTERS[: len(choices)] if choices else _LETTERS
    text = prediction.strip()

    def ok(letter: str | None) -> str | None:
        if letter is None:
            return None
        letter = letter.upper()
        return letter if letter in valid else None

    m = _BARE_LETTER.match(text)
    if m and ok(m.group(1)):
        return ok(m.group(1))
    m = _LEADING_LETTER.match(text)
    if m and ok(m.group(1)):
        return ok(m.group(1))
    for m in _ANSWER_PHRASE.finditer(text):
        if ok(m.group(1)):
            return ok(m.group(1))
    norm_pred = _norm_text(text)
    norm_choices = [_norm_text(c) for c in choices]
    for i, c in enumerate(norm_choices):
        if c and c == norm_pred:
            return _LETTERS[i]
    contained = [
        (len(c), i) for i, c in enumerate(norm_choices) if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", norm_pred)
    ]
    if contained:
        contained.sort(reverse=True)
        if len(contained) == 1 or contained[0][0] > contained[1][0]:
            return _LETTERS[contained[0][1]]
        return None
    found = {ok(m.group(1)) for m in _STANDALONE_LETTER.finditer(text)} - {None}
    if len(found) == 1:
        return found.pop()
    return None


def _answer_letter(answer: str | int, choices: Sequence[str]) -> str:
    if isinstance(answer, int):
        if not 0 <= answer < len(_LETTERS):
            raise ValueError(f"answer index {answer} out of range")
        return _LETTERS[answer]
    a = answer.strip()
    if len(a) == 1 and a.upper() in _LETTERS:
        return a.upper()
    if a.isdigit():
        return _answer_letter(int(a), choices)
    norm = [_norm_text(c) for c in choices]
    if _norm_text(a) in norm:
        return _LETTERS[norm.index(_norm_text(a))]
    raise ValueError(f"answer {answer!r} is neither an option letter, an index nor one of the choices")


def multiple_choice_accuracy(prediction: str, choices: Sequence[str], answer: str | int) -> float:
    """Multiple-choice accuracy (AI2D, MMBench, MMMU, ScienceQA; lmms-eval letter matching).

    The chosen option letter is extracted from the free-form prediction with :func:`extract_choice`
    (``"B"``, ``"(B)"``, ``"B."``, ``"The answer is B"``, or the option text itself). The reference ``answer`` is an
    option letter (``"B"``, MMMU/MMBench), a 0-based index (``1``, AI2D) or the option text.
    Score = 1.0 if the extracted letter equals the reference letter, else 0.0 (also 0.0 when nothing is extracted).
    """
    return float(extract_choice(prediction, choices) == _answer_letter(answer, choices))


# ------------------------------------------------------------------------------------------------------ registry

METRICS: dict[str, Callable[..., float]] = {
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
    "vqa_accuracy": vqa_accuracy,
    "mc_accuracy": multiple_choice_accuracy,
}


def _score_mc(prediction: str, reference: Any) -> float:
    if isinstance(reference, Mapping):
        return multiple_choice_accuracy(prediction, reference["choices"], reference["answer"])
    choices, answer = reference
    return multiple_choice_accuracy(prediction, choices, answer)


def score(metric: str, predictions: Sequence[str], references: Sequence[Any]) -> float:
    """Mean of ``metric`` over the items (a fraction in [0, 1]).

    ``references[i]`` is the answer list (or one answer string) for the answer metrics; for ``"mc_accuracy"`` it is
    ``{"choices": [...], "answer": "B" | 1}`` or a ``(choices, answer)`` pair.
    """
    if metric not in METRICS:
        near = difflib.get_close_matches(metric, list(METRICS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown metric {metric!r}.{hint} Known metrics: {', '.join(sorted(METRICS))}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("cannot score an empty set of predictions")
    fn = METRICS[metric]
    if fn is multiple_choice_accuracy:
        scores = [_score_mc(p, r) for p, r in zip(predictions, references, strict=True)]
    else:
        scores = [fn(p, r) for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)
