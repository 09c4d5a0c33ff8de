"""What every benchmark of the suite shares: alternating timing, the matmul peak for MFU, peak
memory of a call, the result line.

A benchmark builds both sides with the same weights and inputs, checks that their outputs
agree, then times them alternately (ours, reference, ours, ...) after a warm-up of each, so that
a machine that slows down or speeds up during the run weighs on both alike. It returns a
:class:`Result`, printed as one JSON line.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Result:
    """One benchmark's line. ``speedup`` is ref_s / ours_s (> 1: ours is faster); ``limit`` the
    best speedup the FLOP count allows (reference FLOPs / ours), where one can be computed;
    ``mfu`` our model FLOPs per second over the matmul peak measured in the same process;
    ``peak_mem_ratio`` our peak memory over the reference's (< 1: ours takes less). ``extra``
    holds what a benchmark adds (sizes, spreads, a target)."""

    name: str
    ours_s: float | None = None
    ref_s: float | None = None
    max_abs_diff: float | None = None
    peak_mem_ratio: float | None = None
    mfu: float | None = None
    limit: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def speedup(self) -> float | None:
        if self.ours_s is None or self.ref_s is None:
            return None
        return self.ref_s / self.ours_s

    def line(self) -> str:
        """The JSON line: the fields of the issue first, then ``extra``'s."""
        values = {"name": self.name, "ours_s": self.ours_s, "ref_s": self.ref_s, "speedup": self.speedup,
                  "max_abs_diff": self.max_abs_diff, "peak_mem_ratio": self.peak_mem_ratio, "mfu": self.mfu,
                  "limit": self.limit, **self.extra}
        return json.dumps({k: _rounded(v) for k, v in values.items()})


def _rounded(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) else value


@dataclass
class Timing:
    """Medians and spreads (max - min over the rounds) of the two sides, in seconds."""

    ours_s: float
    ref_s: float
    ours_spread_s: float
    ref_spread_s: float

    def into(self, result: Result) -> Result:
        result.ours_s, result.ref_s = self.ours_s, self.ref_s
        result.extra.update(ours_spread_s=self.ours_spread_s, ref_spread_s=self.ref_spread_s)
        return result


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_alternately(
    ours: Callable[[], object], ref: Callable[[], object], rounds: int, device: torch.device | str = "cpu",
    warmup: int = 1,
) -> Timing:
    """Median and spread of each side over ``rounds`` alternating calls, after ``warmup`` calls
    of each; the device is synchronised around every call."""
    for _ in range(warmup):
        ours(), ref()
    synchronize(device)
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(rounds):
        for side, fn in (("ours", ours), ("ref", ref)):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[side].append(time.perf_counter() - start)
    return Timing(statistics.median(times["ours"]), statistics.median(times["ref"]),
                  max(times["ours"]) - min(times["ours"]), max(times["ref"]) - min(times["ref"]))


def matmul_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      size: int = 2048, rounds: int = 5) -> float:
    """FLOPs per second of a large square matmul (``size``; 2 size^3 FLOPs), the best of ``rounds``:
    what this process can reach, the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def machine() -> dict[str, Any]:
    """Where the figures were measured."""
    import platform

    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info

