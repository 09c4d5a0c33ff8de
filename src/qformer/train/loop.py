"""The training loop: one process or torchrun (DDP or FSDP2), accumulation, autocast, clipping,
checkpoints, resume, a clean stop on signals, metrics and plots."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qformer.checkpoint import atomic_write
from qformer.train.batches import data_batches
from qformer.train.build import build_job, build_trained_model, check_recipe
from qformer.train.config import TrainConfig, dump_yaml, load_train_config, resume_changes
from qformer.train.data import TrainShards
from qformer.train.distributed import Runtime, setup_runtime, teardown_runtime
from qformer.train.faults import StepGuard, step_values
from qformer.train.job import Job, save_final
from qformer.train.optim import build_optimizer, build_scheduler
from qformer.train.parallel import (
    clip_gradients,
    gradient_norm,
    gradient_sync,
    is_sharded,
    parallelize,
    whole_root,
)
from qformer.train.plots import plot_metrics
from qformer.train.signals import StopRequests, TrainingStopped
from qformer.train.state import (
    LAUNCH_NAME,
    checkpoint_step,
    clear_run,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    run_files,
    save_checkpoint,
)

logger = logging.getLogger(__name__)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
SKIPS_NAMED = 5  # the first skipped samples are logged by name and reason


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _logged_step(line: str) -> int | None:
    """The step of a ``metrics.jsonl`` line; None for a line cut short by a killed process."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


def _truncate_metrics(path: Path, step: int) -> None:
    """Forget what was logged after the checkpoint a run resumes from (and any line cut short)."""
    if path.is_file():
        steps = [(line, _logged_step(line)) for line in path.read_text(encoding="utf-8").splitlines()]
        kept = [line for line, logged in steps if logged is not None and logged <= step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{line}\n" for line in kept), encoding="utf-8"))


def _log_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train as the recipe says; returns the last logged metrics and evaluation. ``resume``
    continues the run in ``config.output_dir`` from its last checkpoint (only settings in
    :data:`~qformer.train.config.SAFE_ON_RESUME` may differ from its ``config.yaml``);
    ``overwrite`` first clears an earlier run there; a folder holding a run needs one of the
    two. A stop signal saves a checkpoint and raises :class:`TrainingStopped`."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in the folder and --overwrite replaces it: choose one")
    runtime = setup_runtime(config.device)
    try:
        with StopRequests(announce=runtime.is_main) as stops, ExitStack() as cleanup:
            return _train(config, resume, overwrite, runtime, stops, cleanup)
    finally:
        teardown_runtime(runtime)


def _barrier(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        torch.distributed.barrier()


def _decided_on_rank0(runtime: Runtime, decide: Callable[[], Any]) -> Any:
    """``decide()`` run on rank 0 alone (files read once, warnings logged once) and its answer, or
    its ValueError, told to every rank, so that all of them act alike."""
    answer: list[Any] = [None, None]  # the value, or the error's message
    if runtime.is_main:
        try:
            answer[0] = decide()
        except ValueError as err:
            answer[1] = str(err)
    if runtime.world_size > 1:
        torch.distributed.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        raise ValueError(answer[1])
    return answer[0]


def _opened_by_this_launch(run_dir: Path, runtime: Runtime) -> bool:
    """Whether this torchrun launch opened the run in ``run_dir``: a restart takes over only its
    own run, never one its first start was refused."""
    marker = run_dir / LAUNCH_NAME
    return marker.is_file() and marker.read_text(encoding="utf-8") == runtime.launch


def _never_stepped(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run writes before its first step (its config.yaml and
    torchrun's launch marker): a run that failed while it was built, say on data it could not read,
    has nothing to protect, and its corrected rerun should not need --overwrite."""
    found = {path.name for path in run_files(run_dir)}
    return "config.yaml" in found and found <= {"config.yaml", LAUNCH_NAME}


def _open_run(config: TrainConfig, resume: bool, overwrite: bool, runtime: Runtime) -> Path | None:
    """Check the run folder (every rank, before any writes), then on rank 0 clear it if asked
    and write ``config.yaml``. Returns the checkpoint to resume from. When torchrun has restarted
    the workers (``--max-restarts``) after this launch opened the run, the run resumes from its
    last intact checkpoint whatever the command said, or starts over when it has none yet; a
    restart of a launch whose first start was refused is refused alike."""
    run_dir = Path(config.output_dir)
    checkpoint, changes = None, {}
    restarted = runtime.restarts > 0 and _decided_on_rank0(runtime, lambda: _opened_by_this_launch(run_dir, runtime))
    if (resume or restarted) and (run_dir / "config.yaml").is_file():
        checkpoint = _decided_on_rank0(runtime, lambda: latest_checkpoint(run_dir))  # verified once
    if restarted:
        resume, overwrite = checkpoint is not None, checkpoint is None
        if runtime.is_main:
            logger.warning("torchrun restarted the workers (restart %d): %s", runtime.restarts,
                           f"resuming from {checkpoint}" if resume else "no checkpoint yet, starting over")
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} has no config.yaml: there is no run there to resume")
        if checkpoint is None:
            raise FileNotFoundError(f"{run_dir} holds no checkpoint (step_XXXXXXX/) to resume from")
        saved = len(list(checkpoint.glob("rng_rank*.pt")))
        if saved != runtime.world_size and config.data.source != "shards":
            raise ValueError(
                f"{checkpoint} was saved by {saved} process(es) and this run has {runtime.world_size}: the global "
                f"batch and the data order would change; resume with {saved} process(es) (tar shards may resume "
                "on another number)"
            )
        if saved != runtime.world_size and runtime.is_main:
            logger.warning("resuming %d process(es) from a checkpoint of %d: the global batch is now %d samples "
                           "(was %d); the epoch goes on without the samples it took", runtime.world_size, saved,
                           config.data.batch_size * runtime.world_size, config.data.batch_size * saved)
        changes = resume_changes(load_train_config(run_dir / "config.yaml"), config)
        if config.steps < checkpoint_step(checkpoint):
            raise ValueError(f"steps {config.steps} is before the checkpoint {checkpoint} to resume from")
    elif not overwrite and _never_stepped(run_dir):
        overwrite = True
        if runtime.is_main:
            logger.warning("%s holds only the config.yaml of a run that never trained a step: replacing it", run_dir)
    elif not overwrite and run_files(run_dir):
        found = ", ".join(p.name for p in run_files(run_dir)[:3])
        raise ValueError(
            f"{run_dir} already holds a run ({found}, ...): continue it with --resume or replace it with --overwrite"
        )
    _barrier(runtime)  # every rank has looked before rank 0 writes
    if runtime.is_main:
        if overwrite:
            clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        text = dump_yaml(config)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        if runtime.launch is not None:
            atomic_write(run_dir / LAUNCH_NAME, lambda tmp: Path(tmp).write_text(runtime.launch, encoding="utf-8"))
        if changes:
            logger.info("resuming with %s (recorded in config.yaml)",
                        ", ".join(f"{key} {a!r} -> {b!r}" for key, (a, b) in changes.items()))
    return checkpoint


def _log_start(config: TrainConfig, job: Job, runtime: Runtime) -> None:
    """What the run is about to do, on rank 0."""
    if not runtime.is_main:
        return
    params = list(job.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    if isinstance(job.dataset, TrainShards):
        samples = f"{len(job.dataset.reader.shards)} tar shards"
    else:
        samples = f"{len(job.dataset)} training samples"
    batch, accum, world = config.data.batch_size, config.optim.grad_accum_steps, runtime.world_size
    logger.info(
        "run %s: %s, device %s, precision %s, world size %d, %s trainable + %s frozen parameters, "
        "global batch %d (batch_size %d x grad_accum %d x world %d), %d steps",
        config.output_dir, samples, runtime.device, config.precision, world, f"{trainable:,}", f"{frozen:,}",
        batch * accum * world, batch, accum, world, config.steps,
    )


def _resume_command(run_dir: Path, runtime: Runtime) -> str:
    command = f"qformer train {run_dir} --resume"
    return f"torchrun <the same options> -m {command.removeprefix('qformer ')}" if runtime.world_size > 1 else command


def _train(
    config: TrainConfig, resume: bool, overwrite: bool, runtime: Runtime, stops: StopRequests, cleanup: ExitStack
) -> dict[str, Any]:
    run_dir = Path(config.output_dir)
    metrics_file = run_dir / "metrics.jsonl"
    check_recipe(config)  # a mistake found before the run folder is touched
    checkpoint = _open_run(config, resume, overwrite, runtime)
    if checkpoint is not None and checkpoint_step(checkpoint) >= config.steps and (run_dir / "final").is_dir():
        return _finished(run_dir, config.steps, runtime)
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
    batches = cleanup.enter_context(closing(data_batches(job, config, runtime)))  # workers end on any exit
    _log_start(config, job, runtime)

    step, skipped, bad_steps = 0, 0, 0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, runtime.rank, other_world=config.data.source == "shards")
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, skipped, bad_steps = state["step"], state.get("skipped", 0), state.get("bad_steps", 0)
        batches.seek(state["epoch"], state["batch_in_epoch"], state.get("data"))
        if runtime.is_main:
            logger.info("resumed from %s at step %d", checkpoint, step)
            _truncate_metrics(metrics_file, step)

    guard = StepGuard(config.optim.max_bad_steps, bad_steps, log=runtime.is_main)
    writer = _tensorboard(run_dir) if config.tensorboard and runtime.is_main else None
    progress = _progress(config.steps, step, runtime)
    cleanup.callback(progress.close)  # an error then starts on a line of its own
    autocast = AUTOCAST.get(config.precision)
    last: dict[str, Any] = {}
    window_start, window_samples = time.perf_counter(), 0
    model.train()
    while step < config.steps:
        sums: dict[str, torch.Tensor] = {}
        for micro in range(config.optim.grad_accum_steps):
            batch = next(batches)
            skipped = _count_skipped(batch, skipped, runtime)
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
        scaler.unscale_(optimizer)  # fp16: the gradients' true size, for the norm (else nothing)
        if config.optim.max_grad_norm is not None:
            norm = clip_gradients(model.parameters(), config.optim.max_grad_norm)
        else:
            norm = gradient_norm(model.parameters())
        values, requests = step_values(sums, norm, runtime, stops.flags())  # the step's one host sync
        if guard.apply(step + 1, values, scaler):
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        progress.update(1)

        if step % config.log_every == 0 or step == config.steps:
            elapsed = time.perf_counter() - window_start
            last = {name: round(v, 6) for name, v in values.items()}
            last.update(step=step, lr=float(f"{scheduler.get_last_lr()[0]:.6g}"), epoch=batches.epoch, skipped=skipped,
                        bad_steps=guard.bad_steps, samples_per_second=round(window_samples / max(elapsed, 1e-9), 2))
            window_start, window_samples = time.perf_counter(), 0
            if runtime.is_main:
                _log_line(metrics_file, last)
                progress.set_postfix(loss=f"{last['loss']:.3f}", sps=last["samples_per_second"])
                if writer is not None:
                    for name, value in last.items():
                        writer.add_scalar(f"train/{name}", value, step)

        stop = stops.agreed(requests) if step < config.steps else 0
        if stop or step % config.save_every == 0 or step == config.steps:
            trainer = {
                "optimizer": optimizer_state(optimizer),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "epoch": batches.epoch,
                "batch_in_epoch": batches.batch_in_epoch,
                "data": batches.state(),
                "skipped": skipped,
                "bad_steps": guard.bad_steps,
            }
            saved = save_checkpoint(run_dir, step, model, trainer, runtime.rank, config.keep_last)
            if runtime.is_main:
                plot_metrics(metrics_file, run_dir / "curves.png")
                logger.info("saved %s", saved)
        if stop:
            progress.close()
            # said once, by whoever catches it (qformer train prints it on rank 0)
            raise TrainingStopped(stop, step, run_dir / f"step_{step:07d}", _resume_command(run_dir, runtime))

        if job.evaluate is not None and config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            last.update(_evaluate(job, model, objective, step, run_dir, runtime, metrics_file))

    progress.close()
    if runtime.is_main:
        final = run_dir / "final"
        if is_sharded(objective):  # the weights are in shards: rebuilt whole from the last checkpoint
            save_final(build_trained_model(config, run_dir / f"step_{step:07d}"), final)
        else:
            job.save_final(model, final)
        loader = "Blip2Stage1" if config.model.stage == "stage1" else "Blip2"
        logger.info("final model: %s (qformer.%s.from_pretrained loads it)", final, loader)
    _barrier(runtime)
    return last


def _finished(run_dir: Path, steps: int, runtime: Runtime) -> dict[str, Any]:
    """A resumed run that has already reached ``steps`` and saved ``final/``: said in one line
    (with how to go on), and its last logged metrics returned, rather than an empty result."""
    if runtime.is_main:
        logger.warning("%s is finished at step %d: nothing to do (--steps N with a larger N trains on)", run_dir, steps)
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
    logged = [json.loads(line) for line in lines if _logged_step(line) == steps]
    return {"finished": True, **next((record for record in logged if "loss" in record), {"step": steps})}


def _count_skipped(batch: dict, skipped: int, runtime: Runtime) -> int:
    """The running count of skipped samples (this rank's) with the batch's added; the first
    few are logged by name and reason on rank 0."""
    names = batch.pop("skipped_samples", [])
    for offset, name in enumerate(names if runtime.is_main else []):
        if skipped + offset < SKIPS_NAMED:
            logger.info("skipped sample %s (%d skipped so far)", name, skipped + offset + 1)
    return skipped + batch.pop("skipped", 0)


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
        text = json.dumps(record, indent=2)
        atomic_write(run_dir / f"eval_step_{step:07d}.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        # a set named eval gives eval/txt_r1; a named set eval/new_images/txt_r1
        curves = {k if k.startswith("eval/") else f"eval/{k}": v for k, v in results.items() if isinstance(v, float)}
        _log_line(metrics_file, {"step": step, **curves})
        logger.info("evaluation at step %d: %s", step, ", ".join(f"{k} {v}" for k, v in results.items()
                                                                 if isinstance(v, (int, float))))
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
