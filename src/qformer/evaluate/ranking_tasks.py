"""InstructBLIP's held-out candidate-ranking sets (Dai et al. 2023, Table 1), each read from its
official files, scored by :mod:`qformer.pretrained.ranking` (the best of the candidates by
log-likelihood, LAVIS's ``predict_class``):

- ``scienceqa``: ScienceQA-IMG, the test problems that have an image (``problems.json``,
  ``pid_splits.json``, ``images/test/{pid}/image.png``, as ``tools/download.sh`` lays them out);
  the candidates are the problem's choices; accuracy.
- ``iconqa``: IconQA's multi-text-choice problems
  (``iconqa_data/iconqa/test/choose_txt/{qid}/data.json`` and ``image.png``); accuracy.
- ``vsr``: Visual Spatial Reasoning's zero-shot split (``splits/zeroshot/test.jsonl``: ``image``,
  ``caption``, ``label``; images under ``images/``); candidates "true" and "false"; accuracy.
- ``hateful_memes``: ``dev_seen.jsonl`` / ``test_seen.jsonl`` (``img``, ``text``, ``label``);
  candidates "yes" and "no"; the ROC AUC of the probability of "yes" (softmax over the two
  candidates' log-likelihoods), and accuracy.

Prompts are templates with named fields (``{question}``, ``{options}``, ``{context}``,
``{caption}``, ``{text}``); ``--prompt`` replaces a task's. Questions are cleaned as LAVIS's
``blip_question`` cleans them and VSR captions as its ``blip_caption`` (the text processors of
LAVIS's IconQA / ScienceQA and VSR evaluation configs); the options are the choices joined by
"; " (as LAVIS's IconQA and A-OKVQA datasets show them).
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformer.data.transforms import clean_caption, clean_question
from qformer.evaluate.tasks import Benchmark, missing_file, read_benchmark_json

# The default prompts. LAVIS ships no held-out evaluation prompt for these sets, and InstructBLIP's
# appendix (its instruction templates) could not be read where this was written. Hateful Memes':
# MiniGPT-v2's evaluation prompt (after Flamingo's); VSR's: MiniGPT-v2's question, the statement
# quoted and "Answer:" after it; ScienceQA's and IconQA's follow BLIP-2's VQA prompt. --prompt
# replaces them.
SCIENCEQA_PROMPT = "{context}Question: {question} Options: {options}. Answer:"
ICONQA_PROMPT = "Question: {question} Options: {options}. Answer:"
VSR_PROMPT = 'Based on the image, is this statement true or false? "{caption}" Answer:'
HATEFUL_MEMES_PROMPT = 'This is an image with: "{text}" written on it. Is it hateful? Answer:'
VSR_CANDIDATES = ("true", "false")  # label 1, label 0
HATEFUL_MEMES_CANDIDATES = ("yes", "no")  # label 1 (hateful), label 0


@dataclass(frozen=True)
class RankingItem:
    """One question: its image, what its prompt is filled with, its candidates and the right one."""

    question_id: int | str
    image: Path
    fields: dict[str, str]
    candidates: tuple[str, ...]
    label: int | None  # the right candidate's index; None where the split has no answers


@dataclass(frozen=True)
class RankingTask(Benchmark):
    """A benchmark answered by ranking candidates: its prompt template and the fields it may use
    (the first is required), and the files a split needs (checked before a model loads)."""

    prompt: str = ""
    fields: tuple[str, ...] = ()
    files: Callable[[str], tuple[str, ...]] | None = None  # paths under --data, by split
    cleaning: str = ""  # how the fields are cleaned, for the settings


def check_files(task: RankingTask, root: Path, split: str) -> None:
    """A one-line error naming the first of the split's files that is not under ``root``."""
    for name in task.files(split) if task.files is not None else ():
        if not (root / name).exists():
            raise FileNotFoundError(missing_file(root / name))


def check_prompt(task: RankingTask, prompt: str | None) -> str:
    """The task's prompt, or ``prompt`` if it uses only the task's fields and names the first."""
    if prompt is None:
        return task.prompt
    names = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    allowed = ", ".join("{" + name + "}" for name in task.fields)
    if any(name not in task.fields for name in names) or task.fields[0] not in names:
        raise ValueError(f"--prompt {prompt!r}: {task.name}'s prompt takes {allowed} ({{{task.fields[0]}}} needed)")
    return prompt


def fill_prompt(prompt: str, item: RankingItem) -> str:
    """The item's prompt: the template's fields filled from the item's."""
    return prompt.format(**item.fields)


def _options(choices: Sequence[str]) -> str:
    return "; ".join(choices)


def _choices(where: str, entry: dict[str, Any]) -> tuple[tuple[str, ...], int | None]:
    """A problem's choices and the index of its answer, or a one-line error."""
    choices, answer = entry.get("choices"), entry.get("answer")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' should be a list of strings")
    if answer is not None and not (isinstance(answer, int) and 0 <= answer < len(choices)):
        raise ValueError(f"{where}: 'answer' should be the index of one of its {len(choices)} choices")
    return tuple(choices), answer


def _entry(where: str, entry: Any, keys: Sequence[str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{where}: no {', '.join(repr(k) for k in missing)}")
    return entry


def read_scienceqa(root: Path, split: str) -> list[RankingItem]:
    """ScienceQA's ``split`` problems that have an image (ScienceQA-IMG for the test split). The
    hint is the context: LAVIS's ``_predict_class`` puts "context: {hint}. " in front of the
    prompt (here only for a non-empty hint: its test, ``samples['context'] != ''``, compares the
    batch's list with a string and so never skips one)."""
    problems, splits = read_benchmark_json(root / "problems.json"), read_benchmark_json(root / "pid_splits.json")
    if not isinstance(problems, dict):
        raise ValueError(f"{root / 'problems.json'}: expected {{pid: {{...}}}}")
    if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
        raise ValueError(f"{root / 'pid_splits.json'}: no {split!r} list of problem ids")
    items = []
    for pid in splits[split]:
        if str(pid) not in problems:
            raise ValueError(f"{root / 'pid_splits.json'}: problem {pid} is not in problems.json")
        where = f"{root / 'problems.json'}: problem {pid}"
        entry = _entry(where, problems[str(pid)], ("question", "choices", "image"))
        if not entry["image"]:
            continue
        choices, answer = _choices(where, entry)
        hint = (entry.get("hint") or "").strip()
        fields = {"question": clean_question(entry["question"]), "options": _options(choices),
                  "context": f"context: {hint}. " if hint else ""}
        items.append(RankingItem(str(pid), root / "images" / split / str(pid) / entry["image"], fields, choices, answer))
    return items


def read_iconqa(root: Path, split: str) -> list[RankingItem]:
    """IconQA's multi-text-choice problems of ``split``, one folder each, in id order."""
    folder = root / ICONQA_FOLDER.format(split=split)
    if not folder.is_dir():
        raise FileNotFoundError(missing_file(folder))
    problems = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name))
    if not problems:
        raise ValueError(f"{folder}: no problem folders ({{qid}}/data.json and image.png)")
    items = []
    for problem in problems:
        where = str(problem / "data.json")
        entry = _entry(where, read_benchmark_json(problem / "data.json"), ("question", "choices"))
        choices, answer = _choices(where, entry)
        fields = {"question": clean_question(entry["question"]), "options": _options(choices)}
        items.append(RankingItem(problem.name, problem / "image.png", fields, choices, answer))
    return items


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, a malformed line named."""
    if not path.is_file():
        raise FileNotFoundError(missing_file(path))
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error.msg})") from None
    return entries


def _binary(where: str, label: Any) -> int | None:
    """A 0/1 label as the index of its candidate (label 1 is the first candidate)."""
    if label is None:
        return None
    if label not in (0, 1) or isinstance(label, bool):
        raise ValueError(f"{where}: 'label' should be 0 or 1, got {label!r}")
    return 1 - int(label)


def read_vsr(root: Path, split: str) -> list[RankingItem]:
    """VSR's zero-shot ``split``: one statement about an image per line, true (1) or false (0)."""
    path = root / VSR_FILE.format(split=split)
    items = []
    for number, entry in enumerate(_jsonl(path), 1):
        where = f"{path}: line {number}"
        entry = _entry(where, entry, ("image", "caption", "label"))
        items.append(RankingItem(number - 1, root / "images" / entry["image"],
                                 {"caption": clean_caption(entry["caption"])}, VSR_CANDIDATES,
                                 _binary(where, entry["label"])))
    return items


def read_hateful_memes(root: Path, split: str) -> list[RankingItem]:
    """Hateful Memes' ``split``: a meme's image and the text written on it, hateful (1) or not (0)."""
    path = root / f"{split}.jsonl"
    items = []
    for number, entry in enumerate(_jsonl(path), 1):
        where = f"{path}: line {number}"
        entry = _entry(where, entry, ("img", "text"))
        qid = entry.get("id", number - 1)
        items.append(RankingItem(qid, root / entry["img"], {"text": " ".join(str(entry["text"]).split())},
                                 HATEFUL_MEMES_CANDIDATES, _binary(where, entry.get("label"))))
    return items


def rank_items(model: Any, images: Sequence[Any], items: Sequence[RankingItem], prompt: str) -> list[dict[str, Any]]:
    """Each item's prediction: the best candidate and every candidate's log-likelihood."""
    prompts = [fill_prompt(prompt, item) for item in items]
    scores = model.rank_candidates(images, prompts, [item.candidates for item in items])
    return [{"answer": item.candidates[max(range(len(s)), key=s.__getitem__)], "log_likelihoods": s}
            for item, s in zip(items, scores, strict=True)]


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of ``scores`` for the 0/1 ``labels``: scikit-learn's ``roc_auc_score`` (a tie
    counts half). ValueError unless both labels occur."""
    if len(set(labels)) != 2 or not set(labels) <= {0, 1}:
        raise ValueError("ROC AUC needs both labels, 0 and 1, among the items")
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        raise ValueError("ROC AUC needs scikit-learn: pip install 'qformer[eval]'") from None
    return float(roc_auc_score(list(labels), list(scores)))


def _accuracy(predictions: dict[Any, dict[str, Any]], items: Sequence[RankingItem]) -> dict[str, Any]:
    scored = [item for item in items if item.label is not None]
    if not scored:
        return {"count": 0, "note": "no answers in this split"}
    right = sum(predictions[item.question_id]["answer"] == item.candidates[item.label] for item in scored)
    return {"accuracy": round(100 * right / len(scored), 2), "count": len(scored)}


def yes_probability(log_likelihoods: Sequence[float]) -> float:
    """The probability of the first candidate ("yes"), softmax over the two log-likelihoods."""
    yes, no = log_likelihoods
    return 1 / (1 + math.exp(no - yes))


def _auc_and_accuracy(predictions: dict[Any, dict[str, Any]], items: Sequence[RankingItem]) -> dict[str, Any]:
    result = _accuracy(predictions, items)
    scored = [item for item in items if item.label is not None]
    labels = [1 - item.label for item in scored]  # label 1 (hateful) is the first candidate
    if len(set(labels)) < 2:
        return {**result, "auc": None, "note": "ROC AUC needs hateful and non-hateful memes among the items"}
    probabilities = [yes_probability(predictions[item.question_id]["log_likelihoods"]) for item in scored]
    return {"auc": round(100 * roc_auc(labels, probabilities), 2), **result}


ICONQA_FOLDER = "iconqa_data/iconqa/{split}/choose_txt"
VSR_FILE = "splits/zeroshot/{split}.jsonl"
QUESTION_CLEANING = "LAVIS's blip_question (lowercase, punctuation out, 50 words)"

RANKING_TASKS = {
    "scienceqa": RankingTask("scienceqa", ("test", "val"), read_scienceqa, _accuracy, generation={},
                             prompt=SCIENCEQA_PROMPT, fields=("question", "options", "context"),
                             files=lambda split: ("problems.json", "pid_splits.json"), cleaning=QUESTION_CLEANING),
    "iconqa": RankingTask("iconqa", ("test", "val"), read_iconqa, _accuracy, generation={}, prompt=ICONQA_PROMPT,
                          fields=("question", "options"), files=lambda split: (ICONQA_FOLDER.format(split=split),),
                          cleaning=QUESTION_CLEANING),
    "vsr": RankingTask("vsr", ("test", "dev"), read_vsr, _accuracy, generation={}, prompt=VSR_PROMPT,
                       fields=("caption",), files=lambda split: (VSR_FILE.format(split=split),),
                       cleaning="LAVIS's blip_caption on the statement (lowercase, punctuation out, 50 words)"),
    "hateful_memes": RankingTask("hateful_memes", ("dev_seen", "test_seen"), read_hateful_memes, _auc_and_accuracy,
                                 generation={}, prompt=HATEFUL_MEMES_PROMPT, fields=("text",),
                                 files=lambda split: (f"{split}.jsonl",),
                                 cleaning="none (the meme's text, whitespace runs made one space)"),
}
