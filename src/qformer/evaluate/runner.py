"""``qformer eval --model M --task T --data ROOT``: a benchmark of :mod:`qformer.evaluate.benchmarks`
(answers generated) or :mod:`qformer.evaluate.ranking_tasks` (candidates ranked) run on a model,
batched, its predictions appended as they come so that a rerun continues where it stopped.

The output folder holds ``settings.json`` (the task, split, prompt, generation or ranking
settings, the model's fingerprint and the library's versions: what a number needs to be
reproduced), ``predictions.jsonl`` (one ``{"question_id", "answer"}`` per line, for captions
``{"image_id", "caption"}``, for a ranking task ``{"question_id", "prediction": {"answer",
"log_likelihoods"}}``, fsynced batch by batch; under torchrun one file per rank, each rank
answering its share of the questions left),
then ``predictions.json`` (the evaluation server's format) and ``results.json`` (the metric
with the settings). A rerun with other settings is refused rather than mixed in.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qformer.checkpoint import atomic_write
from qformer.evaluate.benchmarks import default_prompt
from qformer.evaluate.outputs import barrier, check_settings, library_versions, rank_and_world, write_json
from qformer.evaluate.ranking_tasks import RankingTask, check_prompt, rank_items
from qformer.evaluate.registry import check_task
from qformer.evaluate.tasks import Benchmark

logger = logging.getLogger(__name__)


def read_predictions(path: Path, keys: tuple[str, str] = ("question_id", "answer")) -> dict[Any, Any]:
    """The predictions a run has written (``keys``: the id's and the text's), a last line cut off
    by an interruption dropped (the file is rewritten without it)."""
    if not path.is_file():
        return {}
    done, lines = {}, path.read_text(encoding="utf-8").splitlines(keepends=True)
    for number, line in enumerate(lines):
        try:
            entry = json.loads(line)
            done[entry[keys[0]]] = entry[keys[1]]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number != len(lines) - 1:
                raise ValueError(f"{path}: line {number + 1} is not a prediction; delete the folder to start over")
            logger.warning("%s: dropping its last line, cut off when the run stopped", path)
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines[:-1]), encoding="utf-8"))
    return done


def evaluate_benchmark(
    model: Any,
    task: str,
    data: str | Path,
    out: str | Path,
    split: str | None = None,
    prompt: str | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    fingerprint: str | None = None,
    **generation: Any,
) -> dict[str, Any]:
    """Run ``task`` on ``model`` (a :class:`~qformer.pretrained.stage2.Blip2` or InstructBLIP) over the data
    under ``data``; returns what ``results.json`` holds. ``generation`` (beams, new tokens) goes
    with a generating task only."""
    from tqdm import tqdm

    from qformer.data.transforms import load_image

    benchmark, split = check_task(task, split)
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError("batch_size and limit must be at least 1")
    questions = benchmark.read(Path(data), split)[:limit]
    if isinstance(benchmark, RankingTask):
        method, keys, answer = _ranking(model, benchmark, prompt, generation)
    else:
        method, keys, answer = _generating(model, benchmark, prompt, generation)
    settings = {"task": task, "split": split, "data": str(Path(data).resolve()), "questions": len(questions),
                **method, "model_fingerprint": fingerprint, "versions": library_versions()}
    out = Path(out)
    rank, world = rank_and_world()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out / "settings.json", settings)
        _answered(out, keys)  # a line cut off by an interruption is dropped here, once
    barrier(world)
    done = _answered(out, keys)
    barrier(world)  # every rank has read the same answers before any rank adds to them
    todo = [q for q in questions if q.question_id not in done][rank::world]  # this rank's share of what is left
    if done and rank == 0:
        logger.info("%s: %d of %d answered already; continuing", out, len(done), len(questions))
    log = out / ("predictions.jsonl" if world == 1 else f"predictions.rank{rank}.jsonl")
    with open(log, "a", encoding="utf-8") as lines, tqdm(total=len(todo), desc=task, unit="q",
                                                         disable=rank != 0) as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images = [load_image(q.image) for q in batch]  # a missing or broken image stops, named
            for question, value in zip(batch, answer(images, batch), strict=True):
                lines.write(json.dumps({keys[0]: question.question_id, keys[1]: value}) + "\n")
            lines.flush()
            os.fsync(lines.fileno())
            progress.update(len(batch))
    barrier(world)
    if rank != 0:
        barrier(world)  # rank 0 writes the results
        return json.loads((out / "results.json").read_text(encoding="utf-8"))
    done = _answered(out, keys)
    predictions = {q.question_id: done[q.question_id] for q in questions}
    write_json(out / "predictions.json", [{keys[0]: k, keys[1]: v} for k, v in predictions.items()])
    results = {**benchmark.score(predictions, questions), "settings": settings}
    write_json(out / "results.json", results)
    barrier(world)
    return results


Answer = Callable[[list[Any], list[Any]], list[Any]]  # (images, items) -> one prediction each


def _generating(model: Any, benchmark: Benchmark, prompt: str | None,
                generation: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, str], Answer]:
    """A question-answering or captioning task's settings, result keys and answering step."""
    from qformer.data.transforms import clean_question

    captioning = benchmark.caption_prompt is not None
    prompt = prompt or (benchmark.caption_prompt if captioning else default_prompt(model.is_encoder_decoder))
    if not captioning and "{}" not in prompt:
        raise ValueError(f"--prompt {prompt!r} has no {{}} for the question")
    generation = {**benchmark.generation, **{k: v for k, v in generation.items() if v is not None}}
    method = {"prompt": prompt,
              "question_cleaning": None if captioning else "LAVIS's blip_question (lowercase, punctuation out, 50 words)",
              "generation": generation}
    keys = ("image_id", "caption") if captioning else ("question_id", "answer")  # the servers' result formats

    def answer(images: list[Any], batch: list[Any]) -> list[str]:
        prompts = [prompt if captioning else prompt.format(clean_question(q.question)) for q in batch]
        return model.generate_text(images, prompts, **generation)

    return method, keys, answer


def _ranking(model: Any, task: RankingTask, prompt: str | None,
             generation: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, str], Answer]:
    """A candidate-ranking task's settings, result keys and answering step."""
    from qformer.pretrained.ranking import RANKING_RULE  # which imports the models

    given = [name for name, value in generation.items() if value is not None]
    if given:
        raise ValueError(f"{task.name} ranks candidates, it generates nothing: {', '.join(given)} do not apply")
    prompt = check_prompt(task, prompt)
    method = {"prompt": prompt, "question_cleaning": task.cleaning, "ranking": RANKING_RULE}
    return method, ("question_id", "prediction"), lambda images, batch: rank_items(model, images, batch, prompt)


def _answered(out: Path, keys: tuple[str, str]) -> dict[Any, str]:
    """Every prediction written so far, by any number of ranks (a rerun may use another number)."""
    done: dict[Any, str] = {}
    for path in sorted(out.glob("predictions*.jsonl")):
        done.update(read_predictions(path, keys))
    return done


def summary_line(results: dict[str, Any], out: Path) -> str:
    """One line: the task, its figures, how many items, where the results are."""
    settings = results["settings"]
    if "txt_r1" in results:
        figures = ", ".join(f"{key} {results[key]:.2f}" for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5",
                                                                    "img_r10"))
        return f"{settings['task']}: {figures} over {results['count']} images ({out / 'results.json'})"
    if "CIDEr" in results:
        figures = ", ".join(f"{key} {results[key]:.2f}" for key in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
                            if isinstance(results.get(key), float))
        domains = results.get("CIDEr_per_domain")
        if domains:
            figures += " (CIDEr " + ", ".join(f"{name} {value:.2f}" for name, value in domains.items()) + ")"
        return f"{settings['task']}: {figures} over {results['count']} images ({out / 'results.json'})"
    metrics = [key for key in ("auc", "vqa_accuracy", "accuracy") if isinstance(results.get(key), float)]
    figure = ", ".join(f"{metric} {results[metric]:.2f}" for metric in metrics) or results.get("note", "")
    return f"{settings['task']} {settings['split']}: {figure} over {results['count']} questions ({out / 'results.json'})"

