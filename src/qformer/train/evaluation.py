"""``qformer eval``: a run's checkpoint evaluated on its recipe's held-out data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qformer.checkpoint import atomic_write
from qformer.train.build import build_job
from qformer.train.config import TrainConfig
from qformer.train.distributed import setup_runtime
from qformer.train.state import load_checkpoint


def evaluate_checkpoint(config: TrainConfig, checkpoint: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    runtime = setup_runtime(config.device)
    if runtime.world_size > 1:
        raise ValueError("qformer eval runs on one process")
    job = build_job(config, runtime)
    if job.evaluate is None:
        raise ValueError("the recipe has no held-out data to evaluate on (data.eval_path, or data.source: scenes)")
    model = job.model.to(runtime.device)
    load_checkpoint(Path(checkpoint), model, rank=0)
    model.eval()
    results = job.evaluate(model)
    target = Path(out) if out else Path(checkpoint) / "eval.json"
    text = json.dumps(results, indent=2)
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    return results
