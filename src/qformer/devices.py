"""Dtypes and devices as users spell them: one parser for the API, configs and the CLI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_SPELLINGS = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
DtypeArg = str | torch.dtype | None
DeviceArg = str | int | torch.device | None
DeviceMapArg = str | Mapping[str, Any] | None


def dtype_name(value: str | torch.dtype) -> str:
    """Every spelling of a floating dtype (``bf16``, ``bfloat16``, ``torch.bfloat16``, the dtype
    itself, ...) -> its config name ``float32`` / ``float16`` / ``bfloat16``."""
    if isinstance(value, torch.dtype):
        for name, dtype in DTYPES.items():
            if dtype == value:
                return name
        raise ValueError(f"unsupported dtype {value}: use float32, float16 or bfloat16")
    spelled = str(value).strip().lower().removeprefix("torch.")
    if spelled not in _DTYPE_SPELLINGS:
        raise ValueError(f"unknown dtype {value!r}: use float32, float16 or bfloat16 (or fp32, fp16, half, bf16)")
    return _DTYPE_SPELLINGS[spelled]


def parse_dtype(value: DtypeArg) -> torch.dtype | str:
    """A requested dtype: a torch dtype, or ``"auto"`` (the checkpoint's; also for None, as transformers)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return "auto"
    return DTYPES[dtype_name(value)]


def default_device() -> str:
    """What a command runs on when no device is named: a GPU if there is one (CUDA, else MPS), else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def parse_device(value: DeviceArg) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``N`` or ``mps``, checked to exist on this machine."""
    if value is None:
        return torch.device("cpu")
    if isinstance(value, int):
        value = f"cuda:{value}"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {value!r}: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"device {value!r}: CUDA is not available ({why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {value!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {value!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise ValueError(f"unknown device {value!r}: use cpu, cuda, cuda:N or mps")
    return device
