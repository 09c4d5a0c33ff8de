"""VQA accuracy exactly as the official evaluation computes it (``vqaEval.py`` of
GT-Vision-Lab/VQA, its current version: "Fixed processing answers bug"), quirks included, so that
a number printed here is the number the official script prints on the same predictions.

Per question, the official script:

1. turns newlines and tabs into spaces and strips the prediction and every human answer;
2. only when the human answers are not all identical, cleans both sides: punctuation (see
   :func:`process_punctuation`), then lowercasing, number words to digits, articles dropped and
   contractions restored (:func:`process_digits_and_articles`). When all human answers are the
   same string nothing is cleaned: "Yes" against ten "yes" scores 0;
3. for each human answer, counts the *other* answers equal to the prediction: acc = min(1, n / 3);
   the question's accuracy is the mean over the human answers (one answer: always 0).

The overall accuracy is the mean over questions, in percent, rounded to 2 decimals as it prints.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official marks, in its order: each is deleted, or replaced by a space (see process_punctuation).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern as written: "(?!<=\d)" is a look-ahead for the text "<=" and a digit (meant as
# a look-behind), which never matches at a period, so it removes a period not followed by a digit.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official call is ``periodStrip.sub("", text, re.UNICODE)``: re.UNICODE (32) lands in ``count``.
PERIODS_REMOVED_AT_MOST = int(re.UNICODE)

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")

# The official contraction table, entry for entry: a word equal to a key (after lowercasing, so the
# keys with capitals never match) becomes its value. It restores few forms with one apostrophe
# missing and maps "somebody'd" to "somebodyd".
# fmt: off
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# fmt: on


def process_punctuation(text: str) -> str:
    """The official punctuation step. A mark is deleted when it touches a space somewhere in the
    text ("red, blue") or when the text holds a comma between digits ("1,000"), else it becomes a
    space ("t-shirt" -> "t shirt"); both conditions are read on the text as it came in. Then at
    most 32 periods not followed by a digit are removed."""
    out = text
    digit_comma = COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIODS_REMOVED_AT_MOST)


def process_digits_and_articles(text: str) -> str:
    """The official second step: lowercase, split on whitespace, number words to digits, articles
    dropped, contractions restored from :data:`CONTRACTIONS`, joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text: str) -> str:
    """An answer as the official script cleans it when the human answers disagree:
    ``"Two dogs."`` -> ``"2 dogs"``, ``"dont"`` -> ``"don't"``."""
    return process_digits_and_articles(process_punctuation(_strip(text)))


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy in [0, 1], as the official script computes it (see the module
    docstring): with ten answers, 4 or more matching give 1.0, 3 give 0.9, 2 give 0.6, 1 gives 0.3."""
    if not answers:
        raise ValueError("a question needs at least one human answer")
    prediction, answers = _strip(prediction), [_strip(answer) for answer in answers]
    if len(set(answers)) > 1:
        prediction, answers = normalize_answer(prediction), [normalize_answer(answer) for answer in answers]
    matches = sum(answer == prediction for answer in answers)
    # Leaving out a matching answer leaves matches - 1 others that agree; leaving out another, matches.
    total = matches * min(1.0, (matches - 1) / 3) + (len(answers) - matches) * min(1.0, matches / 3)
    return total / len(answers)


def vqa_score(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """The official overall accuracy: ``{"accuracy": percent rounded to 2 decimals as the script
    prints it, "count": questions}``."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no questions to score")
    total = sum(vqa_accuracy(prediction, truth) for prediction, truth in zip(predictions, answers, strict=True))
    return {"accuracy": round(100 * total / len(predictions), 2), "count": len(predictions)}
