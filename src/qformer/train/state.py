"""Training checkpoints: trainable weights (safetensors), optimiser, scheduler, RNG states and
data position, written atomically into ``step_XXXXXXX/``; the last k kept. Weights and optimiser
states are stored whole, whether the run shards them (FSDP) or not: a checkpoint resumes under
one process, DDP or FSDP alike. Non-finite weights or optimiser states are never saved, and each
checkpoint carries ``checksums.json`` (every file's size and SHA-256): a damaged one is found
before it is loaded and the run falls back to the one before it."""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from qformer.checkpoint import CHECKSUMS_NAME, checksum_problem, load_plain, read_safetensors, write_checksums
from qformer.train.parallel import shard_like, whole

logger = logging.getLogger(__name__)
STATE_NAME = "trainer.pt"
WEIGHTS_NAME = "trainable.safetensors"
STEP_FOLDER = re.compile(r"step_\d{7,}")


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (read back without unpickling code)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["name"], keys, numpy["position"], numpy["has_gauss"], numpy["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that train, whole, on the CPU (and every buffer is rebuilt from the config).
    A collective when the model is sharded."""
    return {n: whole(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with sharded states gathered whole (a collective when they are):
    the same file under one process, DDP and FSDP."""
    state = optimizer.state_dict()
    gathered = {index: {key: whole(value) for key, value in values.items()} for index, values in state["state"].items()}
    return {**state, "state": gathered}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """:func:`optimizer_state`'s output back into ``optimizer``, each state cut to this process's
    shard where its parameter is sharded (``step`` counts stay whole, as torch keeps them)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local = {
        index: {key: value if key == "step" else shard_like(value, params[index]) for key, value in values.items()}
        for index, values in state["state"].items()
    }
    optimizer.load_state_dict({**state, "state": local})


def non_finite(tensors: dict[str, Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity. Each tensor's norm
    is taken (about 10 GB/s on one core, ten times ``isfinite().all()``; one host sync per device
    the tensors are on); a tensor whose norm is not finite is then looked at element by element,
    so that a huge but finite one is not named."""
    norms: dict[torch.device, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            norms.setdefault(tensor.device, {})[name] = torch.linalg.vector_norm(tensor)
    suspects = [name for group in norms.values()
                for name, finite in zip(group, torch.isfinite(torch.stack(list(group.values()))).tolist())
                if not finite]
    return [name for name in suspects if not torch.isfinite(tensors[name]).all()]


def _refuse_non_finite(step: int, weights: dict[str, Tensor], trainer: dict[str, Any]) -> None:
    """A FloatingPointError before anything is written when a weight or an optimiser state is not
    finite: such a checkpoint would poison every resume."""
    states = {f"optimizer state {index}.{key}": value for index, values in trainer["optimizer"]["state"].items()
              for key, value in values.items() if torch.is_tensor(value)}
    for what, tensors in (("trainable weights", weights), ("optimizer states", states)):
        bad = non_finite(tensors)
        if bad:
            raise FloatingPointError(f"not saving the checkpoint of step {step}: {len(bad)} of {len(tensors)} "
                                     f"{what} hold NaN or infinite values (e.g. {bad[0]})")


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, trainer: dict[str, Any], rank: int, keep_last: int
) -> Path | None:
    """Rank 0 writes weights and trainer state; every rank writes its RNG state (and, when the
    model is sharded, helps gather the weights). Every rank refuses non-finite weights or optimiser
    states (a FloatingPointError, nothing written). Rank 0 writes ``checksums.json`` last and the
    folder is renamed into place when complete, so a crash never leaves half a checkpoint."""
    final = run_dir / f"step_{step:07d}"
    staging = run_dir / f".staging_step_{step:07d}"
    weights = trainable_state(model)  # whole on every rank: each reaches the same verdict
    _refuse_non_finite(step, weights, trainer)
    if rank == 0:
        staging.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier() if torch.distributed.is_initialized() else None
    torch.save(rng_state(), staging / f"rng_rank{rank}.pt")
    if rank == 0:
        save_file(weights, staging / WEIGHTS_NAME, metadata={"step": str(step)})
        torch.save(trainer, staging / STATE_NAME)
    torch.distributed.barrier() if torch.distributed.is_initialized() else None
    if rank != 0:
        return None
    write_checksums(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    if keep_last > 0:
        folders = step_folders(run_dir)
        # a folder of a later step is one a resume passed over as damaged: this step replaces it
        later = [p for p in folders if checkpoint_step(p) > step]
        for old in later + [p for p in folders if checkpoint_step(p) <= step][:-keep_last]:
            shutil.rmtree(old)
    return final


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be used, or None. With ``checksums.json``, every
    file's size then SHA-256 is checked against it. A folder saved before checksums were written
    is accepted when its files are there, read back and hold finite weights."""
    if (path / CHECKSUMS_NAME).is_file():
        return checksum_problem(path)
    for name in (WEIGHTS_NAME, STATE_NAME):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        weights = read_safetensors(path / WEIGHTS_NAME)
        load_plain(path / STATE_NAME)
    except ValueError as err:
        return str(err).removeprefix(f"{path}/")
    bad = non_finite(weights)
    return f"{len(bad)} of {len(weights)} weights are not finite (e.g. {bad[0]})" if bad else None


def check_checkpoint(path: Path) -> None:
    """A ValueError naming the checkpoint and what is wrong when it is damaged."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")


def step_folders(run_dir: Path) -> list[Path]:
    """The ``step_XXXXXXX`` folders of a run, by step (step_10000000 after step_9999999)."""
    return sorted((p for p in run_dir.glob("step_*") if STEP_FOLDER.fullmatch(p.name) and p.is_dir()),
                  key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``step_XXXXXXX`` folder of ``run_dir`` that :func:`checkpoint_problem` passes,
    or None when there is none at all. Each newer damaged one is logged as a warning with what is
    wrong, then the one it falls back to; a ValueError when every one is damaged."""
    damaged: list[str] = []
    for path in reversed(step_folders(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            if damaged:
                logger.warning("falling back to checkpoint %s, the newest that is intact", path)
            return path
        logger.warning("checkpoint %s is damaged (%s): not used", path, problem)
        damaged.append(f"{path.name} ({problem})")
    if damaged:
        raise ValueError(f"every checkpoint in {run_dir} is damaged: {'; '.join(damaged)}")
    return None


def load_trainable(path: Path, model: nn.Module) -> None:
    """A checkpoint's trainable weights into ``model`` (this rank's shards when it is sharded):
    exactly the parameters that train, or an error naming what differs."""
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: expected a step_XXXXXXX folder of a training run")
    weights = read_safetensors(file)
    trainable = dict(model.named_parameters())
    expected = {n for n, p in trainable.items() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{path} does not fit this model: missing {missing}, unexpected {unexpected}")
    misshaped = [f"{name} {tuple(tensor.shape)} vs the model's {tuple(trainable[name].shape)}"  # DTensor: whole
                 for name, tensor in weights.items() if tensor.shape != trainable[name].shape]
    if misshaped:
        raise ValueError(f"{path} does not fit this model: {'; '.join(misshaped)}")
    with torch.no_grad():
        for name, tensor in weights.items():
            trainable[name].copy_(shard_like(tensor, trainable[name]))


def load_checkpoint(path: Path, model: nn.Module, rank: int, other_world: bool = False) -> dict[str, Any]:
    """Restore trainable weights (this rank's shards when the model is sharded) and this rank's
    RNG; returns the trainer state (optimiser, for :func:`load_optimizer_state`, scheduler, step,
    data position). With ``other_world`` (the checkpoint saved by another number of processes),
    a rank the checkpoint has no RNG state for starts from rank ``rank % saved``'s, reseeded
    with its rank so that no two ranks draw alike."""
    load_trainable(path, model)
    rng_file = path / f"rng_rank{rank}.pt"
    saved = len(list(path.glob("rng_rank*.pt")))
    if not rng_file.is_file() and not (other_world and saved):
        raise ValueError(f"{path} has no RNG state for rank {rank}: resume with the world size it was saved with")
    set_rng_state(load_plain(rng_file if rng_file.is_file() else path / f"rng_rank{rank % saved}.pt"))
    if not rng_file.is_file():
        seed = (torch.initial_seed() + 1_000_003 * rank) % 2**63
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
    return load_plain(path / STATE_NAME)


LAUNCH_NAME = ".torchrun_launch"  # which torchrun launch opened the run (see Runtime.launch)
RUN_FILES = ("config.yaml", "metrics.jsonl", "curves.png", "final", "tensorboard", LAUNCH_NAME)
RUN_GLOBS = ("step_*", ".staging_step_*", "eval_step_*.json")


def run_files(run_dir: Path) -> list[Path]:
    """What a run leaves in its folder (config, metrics, checkpoints, evaluations, plots,
    ``final/``), sorted; nothing else in the folder is a run's."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    found += [path for pattern in RUN_GLOBS for path in run_dir.glob(pattern)]
    return sorted(found)


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run left in ``run_dir`` (see :func:`run_files`)."""
    for path in run_files(run_dir):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def checkpoint_step(path: Path) -> int:
    """The step of a ``step_XXXXXXX`` folder."""
    return int(path.name.removeprefix("step_"))
