"""The papers' question-answering and captioning benchmarks: each one's files in its official
layout, its prompt and generation settings as BLIP-2 states them, and its metric.

- ``vqav2``: VQAv2 (``v2_OpenEnded_mscoco_{split}_questions.json``, ``v2_mscoco_{split}_annotations.json``
  and the COCO images ``val2014/COCO_val2014_000000xxxxxx.jpg``); split ``val2014`` (scored) or
  ``test-dev2015`` (predictions only, in the evaluation server's format).
- ``okvqa``: OK-VQA (``OpenEnded_mscoco_val2014_questions.json``, ``mscoco_val2014_annotations.json``,
  COCO val2014 images).
- ``gqa``: GQA balanced test-dev (``testdev_balanced_questions.json``, ``images/{imageId}.jpg``),
  exact match of the cleaned prediction with the answer, as LAVIS scores it.
- ``coco_caption`` and ``flickr_caption``: LAVIS's ``coco_karpathy_test.json`` / ``flickr30k_test.json``
  and the images at their paths; ``nocaps``: ``nocaps_val_4500_captions.json`` and ``images/``,
  CIDEr per domain (in, near, out) too.

VQAv2 and OK-VQA are scored with :func:`qformer.evaluate.vqa.vqa_accuracy`, the official
algorithm. BLIP-2 (Section 4.2, Table 2) prompts OPT with "Question: {} Answer:" and FlanT5 with
"Question: {} Short answer:", and decodes with 5 beams, length penalty -1, at most 10 new tokens
(:data:`qformer.evaluate.tasks.GENERATION`). Captions follow "a photo of", 5 beams, 8 to 30 new
tokens (LAVIS's caption evaluation configs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qformer.evaluate.tasks import Benchmark, read_benchmark_json
from qformer.evaluate.vqa import normalize_answer, vqa_accuracy

DECODER_PROMPT = "Question: {} Answer:"  # BLIP-2 with OPT
ENCODER_DECODER_PROMPT = "Question: {} Short answer:"  # BLIP-2 with FlanT5


@dataclass(frozen=True)
class Question:
    """One item: a question about an image, or (captioning) an image to describe."""

    question_id: int | str  # the question's id, or the image's for captioning
    image: Path
    question: str | None  # None for captioning
    answers: tuple[str, ...] = ()  # human answers (VQA), the answer (GQA), reference captions; none for test splits
    answer_type: str | None = None  # VQA's answer type, NoCaps' domain


def vqa_figures(score_one: Callable[[str, Sequence[str]], float], metric: str) -> Callable[..., dict[str, Any]]:
    """A question-answering task's figures: the metric in percent (2 decimals, as the official
    scripts print), overall and per answer type where the annotations have one."""

    def score(predictions: dict[Any, str], questions: Sequence[Question]) -> dict[str, Any]:
        scored = [q for q in questions if q.answers]
        if not scored:
            return {"count": 0, "note": "no answers in this split: submit predictions.json to the evaluation server"}
        values = {q.question_id: score_one(predictions[q.question_id], q.answers) for q in scored}
        result: dict[str, Any] = {metric: round(100 * sum(values.values()) / len(values), 2), "count": len(values)}
        types = sorted({q.answer_type for q in scored if q.answer_type})
        if types:
            result["per_answer_type"] = {
                kind: round(100 * sum(values[q.question_id] for q in scored if q.answer_type == kind)
                            / sum(1 for q in scored if q.answer_type == kind), 2)
                for kind in types
            }
        return result

    return score


def caption_figures(predictions: dict[Any, str], images: Sequence[Question]) -> dict[str, Any]:
    """BLEU-4, METEOR, ROUGE-L, CIDEr and SPICE (pycocoevalcap, times 100 as the papers print
    them); with domains (NoCaps), CIDEr of each domain on its own, as NoCaps' evaluation computes
    it. SPICE runs where :func:`~qformer.evaluate.captions.spice_unavailable` finds Java and
    Stanford CoreNLP's jars; otherwise the results say why it was skipped."""
    from qformer.evaluate.captions import caption_metrics, spice_unavailable

    def figures(subset: Sequence[Question], metrics: Sequence[str]) -> dict[str, float]:
        scores = caption_metrics({q.question_id: predictions[q.question_id] for q in subset},
                                 {q.question_id: list(q.answers) for q in subset}, metrics)
        return {name: round(100 * value, 2) for name, value in scores.items()}

    skipped = spice_unavailable()
    metrics = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr") + (() if skipped else ("SPICE",))
    result: dict[str, Any] = {**figures(images, metrics), "count": len(images)}
    if skipped:
        result["SPICE"] = f"skipped: {skipped}"
    domains = sorted({q.answer_type for q in images if q.answer_type})
    if domains:
        result["CIDEr_per_domain"] = {
            domain: figures([q for q in images if q.answer_type == domain], ("CIDEr",))["CIDEr"] for domain in domains
        }
    return result


def _coco_image(root: Path, folder: str, image_id: int) -> Path:
    return root / folder / f"COCO_{folder}_{int(image_id):012d}.jpg"


def _vqa_files(root: Path, questions_name: str, annotations_name: str | None, folder: str) -> list[Question]:
    """Questions (and, where the split has them, annotations) in the VQA challenge's format."""
    questions = read_benchmark_json(root / questions_name).get("questions")
    if not isinstance(questions, list):
        raise ValueError(f"{root / questions_name}: expected {{'questions': [...]}}")
    annotations = {}
    if annotations_name is not None:
        entries = read_benchmark_json(root / annotations_name).get("annotations")
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
    entries = read_benchmark_json(root / "testdev_balanced_questions.json")
    if not isinstance(entries, dict):
        raise ValueError(f"{root / 'testdev_balanced_questions.json'}: expected {{question_id: {{...}}}}")
    return [Question(qid, root / "images" / f"{entry['imageId']}.jpg", entry["question"], (entry["answer"],))
            for qid, entry in entries.items()]


def karpathy_test(root: Path, name: str) -> list[Question]:
    """LAVIS's test annotations: ``[{"image": path under root, "caption": [references]}]``."""
    entries = read_benchmark_json(root / name)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"image", "caption"} <= set(e)
                                                for e in entries):
        raise ValueError(f"{root / name}: expected [{{'image': path, 'caption': [captions]}}, ...]")
    return [Question(entry["image"], root / entry["image"], None,
                     tuple([entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]))
            for entry in entries]


def read_coco_caption(root: Path, split: str) -> list[Question]:
    return karpathy_test(root, "coco_karpathy_test.json")


def read_flickr_caption(root: Path, split: str) -> list[Question]:
    return karpathy_test(root, "flickr30k_test.json")


def read_nocaps(root: Path, split: str) -> list[Question]:
    """NoCaps' validation file (``nocaps_val_4500_captions.json``: COCO-style ``images`` with
    their ``domain`` and ``annotations``), the images under ``ROOT/images/``."""
    data = read_benchmark_json(root / "nocaps_val_4500_captions.json")
    references: dict[Any, list[str]] = {}
    for annotation in data.get("annotations", []):
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    return [Question(image["id"], root / "images" / image["file_name"], None, tuple(references.get(image["id"], ())),
                     image.get("domain")) for image in data.get("images", [])]


def gqa_match(prediction: str, answers: Sequence[str]) -> float:
    """LAVIS's GQA score: the prediction cleaned as the VQA script cleans it, equal to the answer."""
    return float(normalize_answer(prediction) == answers[0])


CAPTION_GENERATION = {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8}  # LAVIS's caption eval configs
CAPTION_PROMPT = "a photo of"

BENCHMARKS = {
    "vqav2": Benchmark("vqav2", ("val2014", "test-dev2015"), read_vqav2, vqa_figures(vqa_accuracy, "vqa_accuracy")),
    "okvqa": Benchmark("okvqa", ("val2014",), read_okvqa, vqa_figures(vqa_accuracy, "vqa_accuracy")),
    "gqa": Benchmark("gqa", ("testdev_balanced",), read_gqa, vqa_figures(gqa_match, "accuracy")),
    "coco_caption": Benchmark("coco_caption", ("karpathy_test",), read_coco_caption, caption_figures,
                              dict(CAPTION_GENERATION), CAPTION_PROMPT),
    "nocaps": Benchmark("nocaps", ("val",), read_nocaps, caption_figures, dict(CAPTION_GENERATION), CAPTION_PROMPT),
    "flickr_caption": Benchmark("flickr_caption", ("test",), read_flickr_caption, caption_figures,
                                dict(CAPTION_GENERATION), CAPTION_PROMPT),
}


def default_prompt(is_encoder_decoder: bool) -> str:
    """BLIP-2's VQA prompt for the LLM's family."""
    return ENCODER_DECODER_PROMPT if is_encoder_decoder else DECODER_PROMPT
