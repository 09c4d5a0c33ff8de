"""Evaluation metrics: VQA normalisation and accuracy, COCO caption metrics, exact match."""

import math
import shutil

import pytest

from qformer.evaluate import caption_metrics, exact_match, normalize_answer, vqa_accuracy, vqa_score
from qformer.evaluate.captions import spice_unavailable

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap runs Java programs")
needs_spice = pytest.mark.skipif(spice_unavailable() is not None, reason=f"SPICE: {spice_unavailable()}")


# --- VQA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Two dogs.", "2 dogs"),  # final period stripped, number word to digit
        ("the cat", "cat"),  # article dropped
        ("An Apple", "apple"),  # lowercased
        ("dont", "don't"),  # contraction restored
        ("couldnt've", "couldn't've"),
        ("whats", "what's"),
        ("1.5", "1.5"),  # period followed by a digit kept
        ("5.", "5"),
        ("yes!", "yes"),  # "!" touches no space: becomes a space, then trimmed
        ("t-shirt", "t shirt"),  # same rule inside a word
        ("black - white", "black white"),  # "-" touches a space: deleted
        ("red,blue", "red blue"),
        ("1,000", "1000"),  # a comma between digits: every mark deleted
        ("none", "0"),  # in the official number map
        ("  left\tof\nthe  tree ", "left of tree"),
    ],
)
def test_normalize_answer(raw: str, clean: str) -> None:
    assert normalize_answer(raw) == clean


# With ten answers of which m equal the prediction, leaving out a matching answer leaves m - 1
# matches among the other nine and leaving out another answer leaves m, so
# accuracy = (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10:
#   m = 0: 0
#   m = 1: (1 * 0   + 9 * 1/3) / 10 = 3 / 10 = 0.3
#   m = 2: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
#   m = 3: (3 * 2/3 + 7 * 1)   / 10 = (2 + 7) / 10 = 0.9
#   m = 4: (4 * 1   + 6 * 1)   / 10 = 1.0
@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_answers(matches: int, expected: float) -> None:
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides() -> None:
    # Three matches of four: a left-out match leaves 2 (2/3), the left-out "3" leaves 3 (1): 3/4.
    assert vqa_accuracy("Two.", ["2", "two", "the two", "3"]) == pytest.approx(0.75)
    assert vqa_accuracy("two", ["2", "2", "3", "3"]) == pytest.approx((2 * 1 / 3 + 2 * 2 / 3) / 4)


def test_vqa_accuracy_short_lists() -> None:
    assert vqa_accuracy("yes", ["yes"]) == 0.0  # the official leave-one-out: a lone answer has no other
    assert vqa_accuracy("yes", ["yes", "yes"]) == pytest.approx(1 / 3)  # each sees one other match
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_nothing_is_cleaned_when_the_human_answers_agree() -> None:
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # the official script: stripped, not lowercased
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 9 + ["no"]) == 1.0  # they disagree: both sides cleaned


def test_at_most_32_periods_are_removed() -> None:
    assert normalize_answer("." * 40 + "yes") == "." * 8 + "yes"  # re.UNICODE passed as the count


def test_vqa_accuracy_equals_the_official_script_on_hand_written_cases() -> None:
    """109 hand-written edge cases (punctuation, number words, articles, contractions, whitespace,
    short answer lists, unicode), scored by the official vqaEval.py (its file names its version)."""
    import json
    from pathlib import Path

    official = json.loads((Path(__file__).parent / "data" / "vqa_official_cases.json").read_text())
    different = [(case["prediction"], case["answers"], case["accuracy"], vqa_accuracy(case["prediction"],
                                                                                       case["answers"]))
                 for case in official["cases"]
                 if abs(vqa_accuracy(case["prediction"], case["answers"]) - case["accuracy"]) > 1e-9]
    assert different == []
    score = vqa_score([c["prediction"] for c in official["cases"]], [c["answers"] for c in official["cases"]])
    assert score == {"accuracy": official["overall"], "count": len(official["cases"])}


def test_vqa_score() -> None:
    result = vqa_score(["yes", "2"], [["yes"] * 10, ["two"] + ["3"] * 9])
    assert result == {"accuracy": round(100 * (1.0 + 0.3) / 2, 2), "count": 2}
    with pytest.raises(ValueError):
        vqa_score(["yes"], [])


# --- Captions -------------------------------------------------------------------------------------

REFERENCES = {
    1: ["a man riding a horse on a beach", "a person rides a brown horse along the sea"],
    2: ["two dogs playing with a red ball in the grass"],
    3: ["a plate of food with broccoli and rice"],
}


@needs_java
@pytest.mark.usefixtures("one_meteor_jar")
def test_identical_captions_score_perfectly() -> None:
    references = {key: captions[:1] for key, captions in REFERENCES.items()}
    predictions = {key: captions[0] for key, captions in references.items()}
    predictions[2] = "Two dogs playing\r\nwith a red ball in the grass."  # case, line break, period: tokenised away
    scores = caption_metrics(predictions, references)
    assert list(scores) == ["BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert scores["BLEU-4"] > 0.99
    assert scores["METEOR"] > 0.99
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    # One reference each, equal to the prediction: every n-gram cosine similarity is 1 and the
    # lengths agree, so CIDEr-D = 10 * (mean over n = 1..4 of 1) = 10.
    assert scores["CIDEr"] == pytest.approx(10.0, rel=1e-6)


@needs_java
def test_unrelated_captions_score_zero() -> None:
    predictions = {1: "purple elephants compute quantum fields", 2: "zebra", 3: "lorem ipsum dolor"}
    scores = caption_metrics(predictions, REFERENCES, metrics=("BLEU-4", "ROUGE-L", "CIDEr"))
    assert scores["BLEU-4"] < 1e-6
    assert scores["ROUGE-L"] == 0.0
    assert scores["CIDEr"] == 0.0


@needs_java
def test_caption_metrics_against_hand_computed_values() -> None:
    # Prediction "a cat on a mat" (5 tokens) against "A black cat sits on the mat." (7 tokens once
    # tokenised: the period goes, case is lowered).
    # BLEU-1: clipped unigram matches a (min(2, 1) = 1), cat, on, mat = 4, precision 4/5; the
    # prediction is shorter than the reference, so brevity penalty exp(1 - 7/5) = exp(-0.4).
    # ROUGE-L: the longest common subsequence "a cat on mat" has 4 tokens, P = 4/5, R = 4/7, and
    # with beta = 1.2, F = (1 + beta^2) P R / (R + beta^2 P).
    # CIDEr: with one id every n-gram's document-frequency weight is log(1) - log(1) = 0.
    scores = caption_metrics(
        {"img": "a cat on a mat"}, {"img": ["A black cat sits on the mat."]}, metrics=("BLEU-1", "ROUGE-L", "CIDEr")
    )
    assert scores["BLEU-1"] == pytest.approx(0.8 * math.exp(-0.4), rel=1e-6)  # 0.536256
    precision, recall, beta2 = 4 / 5, 4 / 7, 1.2**2
    rouge_l = (1 + beta2) * precision * recall / (recall + beta2 * precision)  # 0.647215
    assert scores["ROUGE-L"] == pytest.approx(rouge_l)
    assert scores["CIDEr"] == 0.0


def test_caption_metrics_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="java"):
        caption_metrics({1: "a cat"}, {1: ["a cat"]})


def test_spice_is_skipped_with_its_reason(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No Java, or no Stanford CoreNLP jars in pycocoevalcap's spice folder: SPICE says why, and
    caption_metrics refuses it before any Java program starts (nothing is downloaded)."""
    from pycocoevalcap.spice import get_stanford_models

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert spice_unavailable() == "java is not on PATH"
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # Java, as far as a check can tell
    monkeypatch.setattr(get_stanford_models, "SPICEDIR", str(tmp_path))  # a spice folder without its jars
    assert spice_unavailable() == (
        f"no spice-1.0.jar, lib/stanford-corenlp-3.6.0.jar, lib/stanford-corenlp-3.6.0-models.jar in {tmp_path} "
        "(Stanford CoreNLP 3.6.0's jars, which pycocoevalcap downloads on first use: put them there by hand where "
        "there is no network)")
    with pytest.raises(RuntimeError, match=r"SPICE cannot run: no spice-1.0.jar, lib/stanford-corenlp-3.6.0.jar"):
        caption_metrics({1: "a cat"}, {1: ["a cat"]}, metrics=("CIDEr", "SPICE"))
    (tmp_path / "lib").mkdir()
    for name in ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar"):
        (tmp_path / name).touch()
    assert spice_unavailable().startswith(f"no lib/stanford-corenlp-3.6.0-models.jar in {tmp_path} ")
    (tmp_path / "lib" / "stanford-corenlp-3.6.0-models.jar").touch()
    assert spice_unavailable() is None


@needs_spice
def test_spice_is_pycocoevalcaps() -> None:
    from pycocoevalcap.spice.spice import Spice
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions = {1: "a man rides a horse", 2: "two dogs with a ball", 3: "a plate of rice"}
    tokenizer = PTBTokenizer()
    truths = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in REFERENCES.items()})
    expected = Spice().compute_score(truths, tokenizer.tokenize({k: [{"caption": c}] for k, c in predictions.items()}))
    assert caption_metrics(predictions, REFERENCES, metrics=("SPICE",))["SPICE"] == pytest.approx(expected[0])


def test_caption_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown metrics"):
        caption_metrics({1: "a cat"}, {1: ["a cat"]}, metrics=("WER",))
    with pytest.raises(ValueError, match="only one of"):
        caption_metrics({1: "a cat"}, {2: ["a cat"]})
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({1: "a cat"}, {1: []})


def test_exact_match() -> None:
    predictions = {1: "A  dog\n", 2: "a cat", 3: "a bird.", 4: "Two Dogs"}
    references = {1: ["a dog"], 2: ["a kitten", "A CAT"], 3: ["a bird"], 4: ["two dogs playing"]}
    assert exact_match(predictions, references) == 50.0  # 1 and 2 match; 3 differs by its period
    with pytest.raises(ValueError):
        exact_match({1: "a"}, {})
