"""VQAv2 accuracy with the answer normalisation of the official VQA evaluation.

The official evaluation (the ``vqaEval.py`` of the VQA challenge) compares a predicted answer with
the (usually ten) human answers after cleaning punctuation, digits, articles and contractions. This
module follows that description with two deliberate differences, both documented where they apply:

* the prediction and every human answer go through the whole of :func:`normalize_answer`, always;
  the official script cleans only when the human answers disagree, and puts the human answers
  through the punctuation step alone (the released annotations are mostly clean already);
* a question with a single human answer scores 1 for an exact match and 0 otherwise, where the
  leave-one-out rule would leave nothing to compare with.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations

# Characters the official script deletes or turns into a space; the period has a rule of its own.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')

# A comma between digits ("1,000"): when present anywhere, every punctuation mark is deleted.
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")

# The official pattern, kept as written. Its first group is a look-ahead for the text "<=" plus a
# digit (meant as a look-behind), which never matches at a period, so in effect it removes every
# period that is not followed by a digit: "dogs." -> "dogs", "1.5" and ".5" unchanged.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")

# Number words become digits; "none" -> "0" is in the official map too.
_NUMBER_WORDS = {
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

_ARTICLES = frozenset({"a", "an", "the"})

# Contractions in their correct spelling. Each is restored from the same word with any of its
# apostrophes missing ("dont" -> "don't", "couldnt've" -> "couldn't've"). Contractions whose
# apostrophe-less form is an ordinary word ("we'll"/"well", "it's"/"its", "he'll"/"hell",
# "she'd"/"shed", "i'll"/"ill", "we're"/"were", "let's"/"lets") are left out, as in the official map.
# Its quirks are not copied: capitalised keys ("Im", "Ive") that lowercased text never matches, and
# "somebody'd" turned into "somebodyd". This map also restores "shes" and fully stripped double
# contractions ("couldntve"), which the official one leaves as they are.
# fmt: off
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't",
    "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd",
    "how'll", "how's", "isn't", "it'd", "it'd've", "it'll", "ma'am", "mightn't", "mightn't've",
    "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't",
    "she'd've", "she's", "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've",
    "somebody'll", "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "that's", "there'd", "there'd've", "there're",
    "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas", "wasn't",
    "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've", "when's", "where'd",
    "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've",
    "you'd", "you'd've", "you'll", "you're", "you've",
)
# fmt: on


def _without_apostrophes(word: str) -> set[str]:
    """Every spelling of ``word`` with one or more of its apostrophes dropped."""
    positions = [i for i, char in enumerate(word) if char == "'"]
    spellings = set()
    for size in range(1, len(positions) + 1):
        for dropped in combinations(positions, size):
            spellings.add("".join(char for i, char in enumerate(word) if i not in dropped))
    return spellings


CONTRACTION_MAP: dict[str, str] = {spelling: word for word in _CONTRACTIONS for spelling in _without_apostrophes(word)}


def _process_punctuation(text: str) -> str:
    """The official punctuation step.

    A mark is deleted when it touches a space somewhere in the text ("red, blue"), or when the text
    holds a comma between digits ("1,000"); otherwise it becomes a space ("t-shirt" -> "t shirt").
    The conditions are read on the original text, the replacements made on the running result.
    """
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in _PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The official call passes re.UNICODE as the ``count`` argument (at most 32 periods removed);
    # here every matching period goes.
    return _PERIOD_STRIP.sub("", out)


def _process_digits_and_articles(text: str) -> str:
    """Lowercase, number words to digits, articles dropped, contractions restored."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTION_MAP.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official VQA answer cleaning: ``"Two dogs."`` -> ``"2 dogs"``, ``"dont"`` -> ``"don't"``.

    Newlines and tabs become spaces; then punctuation (see :func:`_process_punctuation`), then
    lowercasing, number words to digits, articles removed, contractions restored, and single
    spaces between words.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digits_and_articles(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy of one prediction against the human answers, in [0, 1].

    For each human answer i, acc_i = min(1, (number of the *other* answers equal to the
    prediction) / 3); the result is the mean of acc_i. With ten answers: 4 or more matches give
    1.0, 3 give 0.9, 2 give 0.6, 1 gives 0.3. Shorter lists use the same leave-one-out over the
    answers there are (so two answers that both match give 1/3), except that a single answer
    gives 1.0 for a match and 0.0 otherwise. Everything is normalised first.
    """
    if not answers:
        raise ValueError("a question needs at least one human answer")
    prediction = normalize_answer(prediction)
    matches = sum(normalize_answer(answer) == prediction for answer in answers)
    if len(answers) == 1:
        return float(matches)
    # Leaving out a matching answer leaves matches - 1 others that agree, any other leaves matches.
    left_out_match = min(1.0, (matches - 1) / 3)
    left_out_other = min(1.0, matches / 3)
    return (matches * left_out_match + (len(answers) - matches) * left_out_other) / len(answers)


def vqa_score(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Mean :func:`vqa_accuracy` over questions.

    Returns ``{"accuracy": percent in [0, 100], "count": number of questions}``.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    total = sum(vqa_accuracy(prediction, truth) for prediction, truth in zip(predictions, answers, strict=True))
    return {"accuracy": 100.0 * total / len(predictions), "count": len(predictions)}
