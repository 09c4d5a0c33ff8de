"""The training loop: one process or torchrun (DDP or FSDP2), accumulation, autocast, clipping,
checkpoints, resume, metrics and plots."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qformer.checkpoint import atomic_write
from qformer.train.batches import data_batches
from qformer.train.build import Job, build_job
from qformer.train.config import TrainConfig, dump_yaml
from qformer.train.distributed import Runtime, setup_runtime, teardown_runtime
from qformer.train.optim import build_optimizer, build_scheduler
from qformer.train.parallel import (
    clip_gradients,
    gradient_sync,
    is_sharded,
    parallelize,
    whole_root,
    whole_state_dict,
)
from qformer.train.plots import plot_metrics
from qformer.train.state import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    save_checkpoint,
)

logger = logging.getLogger(__name__)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """Forget what was logged after the checkpoint a run resumes from."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept)))


def _log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train as the recipe says; returns the last logged metrics and evaluation."""
    runtime = setup_runtime(config.device)
    try:
        return _train(config, resume, runtime)
    finally:
        teardown_runtime(runtime)


def _train(config: TrainConfig, resume: bool, runtime: Runtime) -> dict[str, Any]:
    run_dir = Path(config.output_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        text = dump_yaml(config)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    job = build_job(config, runtime)
    torch.manual_seed(config.seed * 1_000_003 + runtime.rank)  # then each rank its own dropout
    model = job.model
    if config.activation_checkpointing:
        model.qformer.gradient_checkpointing = True
    objective = parallelize(job.objective, runtime, config.parallel)  # moves the model (inside it) too
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.steps, config.optim)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.precision == "fp16")
    batches = data_batches(job, config, runtime)

    step = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, runtime.rank)
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        batches.seek(state["epoch"], state["batch_in_epoch"])
        if runtime.is_main:
            logger.info("resumed from %s at step %d", checkpoint, step)
            _truncate_metrics(metrics_file, step)
    elif runtime.is_main and metrics_file.exists():
        metrics_file.unlink()

    writer = _tensorboard(run_dir) if config.tensorboard and runtime.is_main else None
    progress = _progress(config.steps, step, runtime)
    autocast = AUTOCAST.get(config.precision)
    last: dict[str, Any] = {}
    window_start, window_samples, skipped = time.perf_counter(), 0, 0
    model.train()
    while step < config.steps:
        sums: dict[str, float] = {}
        for micro in range(config.optim.grad_accum_steps):
            batch = next(batches)
            skipped += batch.pop("skipped", 0)
            batch = _to_device(batch, runtime.device)
            window_samples += job.batch_size(batch) * runtime.world_size
            generator = torch.Generator(runtime.device).manual_seed(
                (config.seed * 1_000_003 + step * config.optim.grad_accum_steps + micro) * 64 + runtime.rank
            )
            with gradient_sync(objective, enabled=micro == config.optim.grad_accum_steps - 1):
                with torch.autocast(runtime.device.type, dtype=autocast, enabled=autocast is not None):
                    parts = job.losses(objective, batch, generator)
                scaler.scale(parts["loss"] / config.optim.grad_accum_steps).backward()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / config.optim.grad_accum_steps
        if config.optim.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            clip_gradients(model.parameters(), config.optim.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        progress.update(1)

        if step % config.log_every == 0 or step == config.steps:
            values = torch.stack(list(sums.values()))
            if runtime.world_size > 1:
                torch.distributed.all_reduce(values)
                values /= runtime.world_size
            elapsed = time.perf_counter() - window_start
            last = {name: round(float(v), 6) for name, v in zip(sums, values)}
            last.update(step=step, lr=scheduler.get_last_lr()[0], epoch=batches.epoch, skipped=skipped,
                        samples_per_second=round(window_samples / max(elapsed, 1e-9), 2))
            window_start, window_samples = time.perf_counter(), 0
            if runtime.is_main:
                _log_line(metrics_file, last)
                progress.set_postfix(loss=f"{last['loss']:.3f}", sps=last["samples_per_second"])
                if writer is not None:
                    for name, value in last.items():
                        writer.add_scalar(f"train/{name}", value, step)
            if not math.isfinite(last["loss"]):
                raise FloatingPointError(f"loss is {last['loss']} at step {step}")

        if step % config.save_every == 0 or step == config.steps:
            trainer = {
                "optimizer": optimizer_state(optimizer),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "epoch": batches.epoch,
                "batch_in_epoch": batches.batch_in_epoch,
            }
            save_checkpoint(run_dir, step, model, trainer, runtime.rank, config.keep_last)

        if job.evaluate is not None and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            last.update(_evaluate(job, model, objective, step, run_dir, runtime, metrics_file))

    progress.close()
    if runtime.is_main:
        plot_metrics(metrics_file, run_dir / "curves.png")
    if job.save_final is not None:
        with whole_state_dict(objective, model):
            if runtime.is_main:
                job.save_final(model, run_dir / "final")
    return last


def _evaluate(
    job: Job, model: nn.Module, objective: nn.Module, step: int, run_dir: Path, runtime: Runtime, metrics_file: Path
) -> dict[str, Any]:
    """Rank 0 evaluates while the others wait, or with FSDP every rank does (the weights are
    gathered from all of them); rank 0 writes the results to ``eval_step_XXXXXXX.json``."""
    results: dict[str, Any] = {}
    if runtime.is_main or is_sharded(objective):
        model.eval()
        with whole_root(objective):
            results = job.evaluate(model)
        model.train()
    if runtime.is_main:
        record = {"step": step, **results}
        atomic_write(run_dir / f"eval_step_{step:07d}.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        _log_line(metrics_file, {"step": step, **{f"eval/{k}": v for k, v in results.items() if isinstance(v, float)}})
    if runtime.world_size > 1:
        torch.distributed.barrier()
    return results


def _progress(total: int, start: int, runtime: Runtime):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not runtime.is_main, unit="step", dynamic_ncols=True)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from err
    return SummaryWriter(str(run_dir / "tensorboard"))
