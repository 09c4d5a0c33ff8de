"""What every evaluation task is built on: the :class:`Benchmark` type (a task's name, splits,
reader, scoring and generation settings) and the reading of a benchmark's official files. The
task modules (:mod:`~qformer.evaluate.benchmarks`, :mod:`~qformer.evaluate.ranking_tasks`)
import this module; :mod:`~qformer.evaluate.registry` gathers their tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qformer.data.datasets import read_json

# BLIP-2's VQA decoding (Section 4.2), every benchmark's default
GENERATION = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": -1.0}


@dataclass(frozen=True)
class Benchmark:
    name: str
    splits: tuple[str, ...]
    read: Callable[[Path, str], list[Any]]  # (root, split) -> its items: Question, RankingItem
    score: Callable[[dict[Any, Any], Sequence[Any]], dict[str, Any]]  # the predictions' figures, from the items
    generation: dict[str, Any] = field(default_factory=lambda: dict(GENERATION))
    caption_prompt: str | None = None  # a captioning task's prompt (None: a question-answering task)


def missing_file(path: Path) -> str:
    """The one line that names a benchmark's missing file or folder."""
    return f"{path} not found: the benchmark's official file (see the table in docs/evaluation.md)"


def read_benchmark_json(path: Path) -> Any:
    """A benchmark's JSON file, or a one-line error naming it when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(missing_file(path))
    return read_json(path)
