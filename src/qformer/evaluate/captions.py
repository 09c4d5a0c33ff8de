"""COCO caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) through ``pycocoevalcap``, and exact match.

``pycocoevalcap`` is the Python 3 port of the COCO caption evaluation code that BLIP-2 and most
captioning papers report. Its scores come back unchanged, as fractions: a BLEU-4 of 0.42 and a
CIDEr of 1.45 here are what papers print as 42.0 and 145.0.

Captions are first tokenised by the Stanford PTB tokenizer (lowercased, punctuation removed), and
METEOR runs as a jar: both start ``java``, so Java must be on ``PATH``. SPICE is a jar too, which
needs Stanford CoreNLP 3.6.0's two jars in pycocoevalcap's ``spice/lib`` folder; pycocoevalcap
downloads them on first use, so :func:`spice_unavailable` checks for them first and nothing here
ever triggers that download.
"""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from qformer.checks import one_line

DEFAULT_METRICS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
KNOWN_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here (no Java, no pycocoevalcap, a missing jar), or None when it can.
    Looks for the files only: never starts pycocoevalcap's download of Stanford CoreNLP."""
    if shutil.which("java") is None:
        return "java is not on PATH"
    try:
        from pycocoevalcap.spice import get_stanford_models, spice
    except ImportError:
        return "pycocoevalcap is not installed"
    folder = Path(get_stanford_models.SPICEDIR)
    needed = [spice.SPICE_JAR] + [f"{get_stanford_models.SPICELIB}/{get_stanford_models.JAR}{end}"
                                  for end in (".jar", "-models.jar")]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        return (f"no {', '.join(missing)} in {folder} (Stanford CoreNLP 3.6.0's jars, which pycocoevalcap downloads "
                "on first use: put them there by hand where there is no network)")
    return None


def _check_ids(predictions: Mapping[Hashable, object], references: Mapping[Hashable, object]) -> None:
    """Raise ValueError unless both mappings cover the same, non-empty set of ids."""
    if not predictions:
        raise ValueError("no predictions to score")
    missing = set(predictions).symmetric_difference(references)
    if missing:
        sample = sorted(map(repr, missing))[:5]
        raise ValueError(f"{len(missing)} ids are in only one of predictions and references, e.g. {sample}")
    empty = [key for key, captions in references.items() if not captions]
    if empty:
        raise ValueError(f"{len(empty)} ids have no reference captions, e.g. {empty[:5]!r}")


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Corpus-level caption metrics of one predicted caption per id against its references.

    ``metrics`` may name any of :data:`KNOWN_METRICS`. Scores are as ``pycocoevalcap`` returns
    them, fractions rather than percentages: BLEU-n, METEOR and ROUGE-L lie in [0, 1]; CIDEr (the
    COCO code's CIDEr-D: clipped counts, length penalty, times 10) is unbounded, above 1 for a
    strong COCO captioner. CIDEr weighs n-grams by their document frequency over the references
    given here, so it means something only on a corpus: with a single id every weight is 0, and so
    is the score.

    SPICE (the scene-graph F-score, averaged over ids) needs what :func:`spice_unavailable`
    checks for.

    Raises RuntimeError when ``java`` is not on PATH (the PTB tokenizer and METEOR need it) or
    SPICE is asked for and cannot run, ImportError when ``pycocoevalcap`` is not installed,
    ValueError for unknown metrics or mismatched ids.
    """
    unknown = [name for name in metrics if name not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {KNOWN_METRICS}")
    _check_ids(predictions, references)
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption metrics need Java: `java` is not on PATH, and pycocoevalcap's PTB tokenizer"
            " and METEOR run as Java programs. Install a JRE (e.g. `apt-get install default-jre`)."
        )
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise ImportError("caption metrics need pycocoevalcap: `pip install pycocoevalcap`") from error
    skipped = spice_unavailable() if "SPICE" in metrics else None
    if skipped:
        raise RuntimeError(f"SPICE cannot run: {skipped}")

    # The tokenizer pairs its output lines with the captions in order, so no caption may hold a
    # line break of any kind (pycocoevalcap replaces only "\n"): all whitespace becomes one space.
    tokenizer = PTBTokenizer()
    candidates = tokenizer.tokenize({key: [{"caption": one_line(text)}] for key, text in predictions.items()})
    truths = tokenizer.tokenize(
        {key: [{"caption": one_line(text)} for text in references[key]] for key in predictions}
    )

    scores: dict[str, float] = {}
    bleu_names = [name for name in metrics if name.startswith("BLEU-")]
    if bleu_names:
        bleu, _ = Bleu(4).compute_score(truths, candidates, verbose=0)
        scores.update({name: float(bleu[int(name[-1]) - 1]) for name in bleu_names})
    if "METEOR" in metrics:
        meteor = Meteor()  # starts the jar; it is stopped when the object is freed
        scores["METEOR"] = float(meteor.compute_score(truths, candidates)[0])
        del meteor
    if "ROUGE-L" in metrics:
        scores["ROUGE-L"] = float(Rouge().compute_score(truths, candidates)[0])
    if "CIDEr" in metrics:
        scores["CIDEr"] = float(Cider().compute_score(truths, candidates)[0])
    if "SPICE" in metrics:
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(truths, candidates)[0])
    return {name: scores[name] for name in metrics}


def exact_match(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> float:
    """Percent (0 to 100) of ids whose prediction equals one of its references.

    Both sides are lowercased and their whitespace collapsed; punctuation counts.
    """
    _check_ids(predictions, references)
    hits = sum(
        any(one_line(prediction.lower()) == one_line(reference.lower()) for reference in references[key])
        for key, prediction in predictions.items()
    )
    return 100.0 * hits / len(predictions)
