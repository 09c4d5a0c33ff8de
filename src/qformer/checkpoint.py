"""Weights on disk: safetensors + JSON config, written atomically, loaded strictly."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qformer.config import ConfigBase

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CHECKSUMS_NAME = "checksums.json"


class StateDictMismatchError(ValueError):
    """A state dict does not fit a model: lists every missing, unexpected and mis-shaped key."""


def new_file_mode() -> int:
    """The permissions a file newly created here gets (0666 less the umask). Linux reports the
    umask in /proc/self/status; elsewhere it is read by setting it and putting it back, which
    for an instant gives another thread's new file the umask 022."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
        umask = next(int(line.split()[1], 8) for line in status.splitlines() if line.startswith("Umask:"))
    except (OSError, StopIteration):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[str], None], mode: int | None = None) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a reader never sees half a file.

    The file gets ``mode``, by default :func:`new_file_mode`, as if written in place: mkstemp's
    0600, whatever the umask, kept a checkpoint from the group that was meant to read it (a server
    run by another user, a shared disk) while the tokenizer files beside it were readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = new_file_mode() if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` fills a staging folder beside ``directory``, which is then renamed into
    place: a reader finds the whole directory or none (an older ``directory`` is replaced only once
    the new one is complete). A failed ``write`` leaves neither a staging folder nor a half one."""
    directory = Path(directory)
    staging = directory.with_name(f".staging_{directory.name}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if directory.exists():
        old = directory.with_name(f".old_{directory.name}")
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
        staging.rename(directory)
        shutil.rmtree(old)
    else:
        staging.rename(directory)
    return directory


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """The SHA-256 of a file, read in 16 MiB pieces (about 1 GB/s on one core)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(chunk):
            digest.update(piece)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """``checksums.json`` in ``folder``: every other file's size and SHA-256, written last and
    atomically, so that :func:`checksum_problem` can tell a complete folder from a damaged one."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_NAME}
    text = json.dumps({"algorithm": "sha256", "files": files}, indent=1)
    atomic_write(folder / CHECKSUMS_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def checksum_problem(folder: Path) -> str | None:
    """Why ``folder`` does not match its ``checksums.json`` (a file missing, of another size or
    with another SHA-256; an unreadable manifest), or None when every file listed matches.
    Sizes are compared first: a truncated file is found without reading it."""
    try:
        files = json.loads((folder / CHECKSUMS_NAME).read_text(encoding="utf-8"))["files"]
        listed = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{CHECKSUMS_NAME} is unreadable ({type(err).__name__})"
    for name, (size, _) in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} when saved"
    for name, (_, digest) in listed.items():
        if sha256_file(folder / name) != digest:
            return f"{name} does not match its SHA-256 from when it was saved"
    return None


@contextmanager
def safetensors_errors(path: str | Path) -> Iterator[None]:
    """A damaged safetensors file (truncated, garbage, an oversized header) read inside: one
    line naming it."""
    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file, damaged or truncated? ({err})") from None


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (see :func:`safetensors_errors`)."""
    with safetensors_errors(path):
        return load_file(path)


def write_safetensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Tensors to a safetensors file, atomically (see :func:`atomic_write`)."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_plain(path: str | Path, mmap: bool = False) -> Any:
    """A ``torch.save`` file of tensors and plain containers (dict, list, tuple, numbers,
    strings), read with ``torch.load(weights_only=True)``: a pickle that asks for anything else,
    which could run code, is refused, and a damaged file is named, each in one line."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if wanted is None:
            detail = str(err).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            reason = re.sub(r"\s+", " ", detail).strip()[:200]
            raise ValueError(f"{path}: not a torch checkpoint, or a damaged one ({reason})") from None
        raise ValueError(
            f"{path}: refused to unpickle it: only plain tensors and containers (dict, list, numbers, strings) are "
            f"read (torch.load(weights_only=True)); this file asks for {wanted.group(1)}, which could run code"
        ) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, EOFError, OSError) as err:  # a truncated zip: torch's reader errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: a damaged or truncated torch file ({reason})") from None


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], loaded_prefix: str | None = None) -> None:
    """Raise :class:`StateDictMismatchError` unless keys and shapes match ``model`` exactly
    (but for the keys under ``loaded_prefix``: a part loaded already, e.g. a quantised LLM)."""
    expected = {k: v for k, v in model.state_dict().items() if not (loaded_prefix and k.startswith(loaded_prefix))}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or misshaped:
        lines = [f"state dict does not fit {type(model).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                lines.append(f"  {len(keys)} {title}:")
                lines.extend(f"    {k}" for k in keys)
        raise StateDictMismatchError("\n".join(lines))


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Check first (every problem named at once), then copy."""
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)


def save_model(model: nn.Module, config: ConfigBase, directory: str | Path) -> None:
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, config.save)


def read_weights(directory: str | Path) -> dict[str, Tensor]:
    """All tensors of a transformers-layout directory: ``model.safetensors``, sharded
    safetensors (``model.safetensors.index.json``) or ``pytorch_model.bin`` (read with
    ``weights_only=True``)."""
    import json

    directory = Path(directory)
    single = directory / WEIGHTS_NAME
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(read_safetensors(directory / shard))
        return tensors
    if legacy.is_file():
        return load_plain(legacy)
    raise FileNotFoundError(f"no weights in {directory}: expected {WEIGHTS_NAME}, a sharded index or pytorch_model.bin")
