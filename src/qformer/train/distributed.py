"""Process-group set-up from torchrun's environment (one process needs none)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from qformer.devices import parse_device


@dataclass
class Runtime:
    """Where this process runs. ``restarts``: how many times torchrun (``--max-restarts``) has
    restarted the workers after one failed (``TORCHELASTIC_RESTART_COUNT``; 0 on the first start);
    ``launch``: which torchrun launch this process belongs to (:func:`torchrun_launch`)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    restarts: int = 0
    launch: str | None = None

    @property
    def group(self) -> dist.ProcessGroup | None:
        return dist.group.WORLD if self.world_size > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_launch() -> str | None:
    """The same string in every attempt of one torchrun launch and another in the next launch:
    the rendezvous id where one was given (``--rdzv-id``, or ``--standalone``'s own), else this
    node's host and torchrun agent's process id; None outside torchrun. Rank 0's is the run's."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return run_id if run_id not in ("", "none") else f"{socket.gethostname()}:{os.getppid()}"


def _attempt_store(rank: int, world: int, timeout: timedelta) -> dict:
    """``init_process_group``'s store, when torchrun's agent holds it: this attempt's own keys in
    it. With a static rendezvous (``--master_addr`` / ``--master_port``) torchrun keeps one store
    for every restart, and the addresses the failed attempt's workers left there make the new
    ones connect to dead processes (gloo: "Connection refused"). Otherwise nothing (env://)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    return {"store": dist.PrefixStore(f"qformer/attempt_{attempt}", store), "rank": rank, "world_size": world}


def setup_runtime(device: str = "auto") -> Runtime:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK / TORCHELASTIC_RESTART_COUNT (set by torchrun); NCCL
    on GPUs, gloo on CPUs. After a restart the group forms anew (see :func:`_attempt_store`)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():  # said once, naming the option and this torch
        raise ValueError(f"device {device}: CUDA is not available on this machine (torch {torch.__version__})")
    target = parse_device(f"cuda:{local_rank}" if device == "cuda" else device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        timeout = timedelta(minutes=30)
        dist.init_process_group(backend, timeout=timeout, **_attempt_store(rank, world, timeout))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return Runtime(rank, world, local_rank, target, restarts, torchrun_launch())


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
