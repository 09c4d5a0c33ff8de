"""Non-finite training steps. A step whose loss or gradient norm is NaN or infinite is skipped:
its gradients are dropped and the weights and optimiser state stay as they were (the data was
read, so the step counts and the schedule moves on). More than ``optim.max_bad_steps`` such steps
in a row stop the run with a FloatingPointError; nothing non-finite was applied or saved, so a
resume continues from the last checkpoint.

One check a step, before the update: the step's losses and its gradient norm in one tensor (with
the stop requests of :mod:`~qformer.train.signals`), averaged over the processes in one small
all-reduce (a NaN or an infinity on any process reaches
every process, so all of them decide alike) and read with one host sync. The values are the
step's logged metrics too, so the logging needs no collective of its own.

fp16: the GradScaler skips a step whose gradients overflow and lowers its scale; that is mixed
precision's normal course, not a fault. Such a step (a finite loss, non-finite gradients) is left
to the scaler and not counted, until the scale is below ``MIN_FP16_SCALE``: overflow at a scale
that low is no longer the scale's doing, and the step counts as bad.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from qformer.train.distributed import Runtime

logger = logging.getLogger(__name__)
MIN_FP16_SCALE = 1.0


def step_values(
    losses: dict[str, Tensor], grad_norm: Tensor, runtime: Runtime, flags: Sequence[float] = ()
) -> tuple[dict[str, float], list[float]]:
    """``losses`` and ``grad_norm`` (under ``"grad_norm"``) averaged over the processes, as
    floats, and ``flags`` (the stop requests, :meth:`~qformer.train.signals.StopRequests.flags`)
    summed over them: one all-reduce when there are several, one host sync."""
    flags_tensor = torch.tensor(flags, dtype=torch.float32, device=runtime.device)
    values = torch.cat([torch.stack([*losses.values(), grad_norm.detach().float().to(runtime.device)]), flags_tensor])
    if runtime.world_size > 1:
        dist.all_reduce(values)
    read = values.tolist()  # the one host sync
    names = [*losses, "grad_norm"]
    return {name: v / runtime.world_size for name, v in zip(names, read)}, read[len(names):]


class StepGuard:
    """Decides, from :func:`step_values`, whether a step's update is applied; counts the bad
    steps (``bad_steps`` in all, carried across a resume) and stops the run after more than
    ``max_bad_steps`` in a row. Warnings are logged where ``log`` (rank 0)."""

    def __init__(self, max_bad_steps: int, bad_steps: int = 0, log: bool = True) -> None:
        self.max_bad_steps, self.bad_steps, self.log, self.in_row = max_bad_steps, bad_steps, log, 0

    def apply(self, step: int, values: dict[str, float], scaler: torch.amp.GradScaler) -> bool:
        """Whether step ``step``'s update goes ahead (with fp16 the scaler may still skip it); a
        FloatingPointError when the bad steps in a row are too many."""
        loss_ok = all(math.isfinite(v) for name, v in values.items() if name != "grad_norm")
        if loss_ok and math.isfinite(values["grad_norm"]):
            self.in_row = 0
            return True
        if loss_ok and scaler.is_enabled() and scaler.get_scale() >= MIN_FP16_SCALE:
            return True  # fp16 overflow: the scaler skips the update and lowers its scale
        self.bad_steps += 1
        self.in_row += 1
        found = ", ".join(f"{'the gradient norm' if name == 'grad_norm' else name} {v}"
                          for name, v in values.items() if not math.isfinite(v))
        if self.in_row > self.max_bad_steps:
            raise FloatingPointError(
                f"too many non-finite steps in a row ({self.in_row}, up to step {step}; the last: {found}), more "
                f"than optim.max_bad_steps {self.max_bad_steps}: stopped; none of them changed the weights, and a "
                "resume continues from the last checkpoint"
            )
        if self.log:
            logger.warning("step %d skipped, its update not applied: %s (%d in a row; optim.max_bad_steps %d)",
                           step, found, self.in_row, self.max_bad_steps)
        return False
