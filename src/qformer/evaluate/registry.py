"""Every task of ``qformer eval --task``, gathered from the modules that define them: answers
generated (VQA and captioning, :data:`~qformer.evaluate.benchmarks.BENCHMARKS`), candidates
ranked (:data:`~qformer.evaluate.ranking_tasks.RANKING_TASKS`) and image-text retrieval
(:data:`~qformer.evaluate.retrieval_tasks.RETRIEVAL_TASKS`). The task modules build on
:mod:`qformer.evaluate.tasks` and never import this one."""

from __future__ import annotations

from qformer.evaluate.benchmarks import BENCHMARKS
from qformer.evaluate.ranking_tasks import RANKING_TASKS
from qformer.evaluate.retrieval_tasks import RETRIEVAL_TASKS
from qformer.evaluate.tasks import Benchmark

TASKS = (*BENCHMARKS, *RANKING_TASKS, *RETRIEVAL_TASKS)  # every task's name, in the order --task lists them


def check_task(task: str, split: str | None) -> tuple[Benchmark, str]:
    """The benchmark named ``task`` (generating, or ranking candidates: a
    :class:`~qformer.evaluate.ranking_tasks.RankingTask`) and its ``split`` (default: its
    first), or a one-line error."""
    tasks = {**BENCHMARKS, **RANKING_TASKS}
    if task not in tasks:
        raise ValueError(f"--task {task!r}: one of {', '.join(tasks)}")
    benchmark = tasks[task]
    split = split or benchmark.splits[0]
    if split not in benchmark.splits:
        raise ValueError(f"--split {split!r}: {task} has {', '.join(benchmark.splits)}")
    return benchmark, split
