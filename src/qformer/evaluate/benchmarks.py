"""The papers' question-answering benchmarks: each one's files in its official layout, its prompt
and generation settings as BLIP-2 states them (Section 4.2, Table 2), and its metric.

- ``vqav2``: VQAv2 (``v2_OpenEnded_mscoco_{split}_questions.json``, ``v2_mscoco_{split}_annotations.json``
  and the COCO images ``val2014/COCO_val2014_000000xxxxxx.jpg``); split ``val2014`` (scored) or
  ``test-dev2015`` (predictions only, in the evaluation server's format).
- ``okvqa``: OK-VQA (``OpenEnded_mscoco_val2014_questions.json``, ``mscoco_val2014_annotations.json``,
  COCO val2014 images).
- ``gqa``: GQA balanced test-dev (``testdev_balanced_questions.json``, ``images/{imageId}.jpg``),
  exact match of the cleaned prediction with the answer, as LAVIS scores it.

VQAv2 and OK-VQA are scored with :func:`qformer.evaluate.vqa.vqa_accuracy`, the official
algorithm. BLIP-2 prompts OPT with "Question: {} Answer:" and FlanT5 with "Question: {} Short
answer:", and decodes with 5 beams, length penalty -1, at most 10 new tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qformer.evaluate.vqa import normalize_answer, vqa_accuracy

DECODER_PROMPT = "Question: {} Answer:"  # BLIP-2 with OPT
ENCODER_DECODER_PROMPT = "Question: {} Short answer:"  # BLIP-2 with FlanT5
GENERATION = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}


@dataclass(frozen=True)
class Question:
    question_id: int | str
    image: Path
    question: str
    answers: tuple[str, ...] = ()  # the human answers (VQA) or the one answer (GQA); none for test splits
    answer_type: str | None = None


@dataclass(frozen=True)
class Benchmark:
    name: str
    splits: tuple[str, ...]
    read: Callable[[Path, str], list[Question]]
    score_one: Callable[[str, Sequence[str]], float]  # one prediction against its answers, in [0, 1]
    metric: str
    generation: dict[str, Any] = field(default_factory=lambda: dict(GENERATION))

    def score(self, predictions: dict[Any, str], questions: Sequence[Question]) -> dict[str, Any]:
        """The metric in percent (2 decimals, as the official scripts print), overall and per
        answer type where the annotations have one."""
        scored = [q for q in questions if q.answers]
        if not scored:
            return {"count": 0, "note": "no answers in this split: submit predictions.json to the evaluation server"}
        values = {q.question_id: self.score_one(predictions[q.question_id], q.answers) for q in scored}
        result: dict[str, Any] = {self.metric: round(100 * sum(values.values()) / len(values), 2), "count": len(values)}
        types = sorted({q.answer_type for q in scored if q.answer_type})
        if types:
            result["per_answer_type"] = {
                kind: round(100 * sum(values[q.question_id] for q in scored if q.answer_type == kind)
                            / sum(1 for q in scored if q.answer_type == kind), 2)
                for kind in types
            }
        return result


def _load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the benchmark's official file (see the README's evaluation table)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _coco_image(root: Path, folder: str, image_id: int) -> Path:
    return root / folder / f"COCO_{folder}_{int(image_id):012d}.jpg"


def _vqa_files(root: Path, questions_name: str, annotations_name: str | None, folder: str) -> list[Question]:
    """Questions (and, where the split has them, annotations) in the VQA challenge's format."""
    questions = _load(root / questions_name).get("questions")
    if not isinstance(questions, list):
        raise ValueError(f"{root / questions_name}: expected {{'questions': [...]}}")
    annotations = {}
    if annotations_name is not None:
        entries = _load(root / annotations_name).get("annotations")
        if not isinstance(entries, list):
            raise ValueError(f"{root / annotations_name}: expected {{'annotations': [...]}}")
        annotations = {entry["question_id"]: entry for entry in entries}
    out = []
    for entry in questions:
        annotation = annotations.get(entry["question_id"])
        if annotations_name is not None and annotation is None:
            raise ValueError(f"question {entry['question_id']} has no annotation in {annotations_name}")
        answers = tuple(a["answer"] for a in annotation["answers"]) if annotation else ()
        out.append(Question(entry["question_id"], _coco_image(root, folder, entry["image_id"]), entry["question"],
                            answers, annotation.get("answer_type") if annotation else None))
    return out


def read_vqav2(root: Path, split: str) -> list[Question]:
    folder = {"val2014": "val2014", "test-dev2015": "test2015"}[split]
    annotations = f"v2_mscoco_{split}_annotations.json" if split == "val2014" else None
    return _vqa_files(root, f"v2_OpenEnded_mscoco_{split}_questions.json", annotations, folder)


def read_okvqa(root: Path, split: str) -> list[Question]:
    return _vqa_files(root, "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", "val2014")


def read_gqa(root: Path, split: str) -> list[Question]:
    entries = _load(root / "testdev_balanced_questions.json")
    if not isinstance(entries, dict):
        raise ValueError(f"{root / 'testdev_balanced_questions.json'}: expected {{question_id: {{...}}}}")
    return [Question(qid, root / "images" / f"{entry['imageId']}.jpg", entry["question"], (entry["answer"],))
            for qid, entry in entries.items()]


def gqa_match(prediction: str, answers: Sequence[str]) -> float:
    """LAVIS's GQA score: the prediction cleaned as the VQA script cleans it, equal to the answer."""
    return float(normalize_answer(prediction) == answers[0])


BENCHMARKS = {
    "vqav2": Benchmark("vqav2", ("val2014", "test-dev2015"), read_vqav2, vqa_accuracy, "vqa_accuracy"),
    "okvqa": Benchmark("okvqa", ("val2014",), read_okvqa, vqa_accuracy, "vqa_accuracy"),
    "gqa": Benchmark("gqa", ("testdev_balanced",), read_gqa, gqa_match, "accuracy"),
}


def check_task(task: str, split: str | None) -> tuple[Benchmark, str]:
    """The benchmark named ``task`` and its ``split`` (default: its first), or a one-line error."""
    if task not in BENCHMARKS:
        raise ValueError(f"--task {task!r}: one of {', '.join(BENCHMARKS)}")
    benchmark = BENCHMARKS[task]
    split = split or benchmark.splits[0]
    if split not in benchmark.splits:
        raise ValueError(f"--split {split!r}: {task} has {', '.join(benchmark.splits)}")
    return benchmark, split


def default_prompt(is_encoder_decoder: bool) -> str:
    """BLIP-2's VQA prompt for the LLM's family."""
    return ENCODER_DECODER_PROMPT if is_encoder_decoder else DECODER_PROMPT
