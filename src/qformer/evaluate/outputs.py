"""An evaluation's output folder and its ranks: JSON written atomically, the settings a rerun
must share, the library's versions, and the rank and barrier through which torchrun processes
share the work. Shared by :mod:`~qformer.evaluate.runner` and
:mod:`~qformer.evaluate.retrieval_tasks`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qformer.checkpoint import atomic_write


def write_json(path: Path, value: Any) -> None:
    """``value`` as indented JSON at ``path``, written atomically."""
    text = json.dumps(value, indent=1, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def library_versions() -> dict[str, str]:
    """The versions a figure was computed with: qformer, torch, transformers."""
    import torch
    import transformers

    from qformer import __version__

    return {"qformer": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def check_settings(path: Path, settings: dict[str, Any], holds: str = "predictions made",
                    remedy: str = "pass another --out, or delete it to start over") -> None:
    """Write the run's settings, or refuse a rerun whose settings differ from those written
    (``holds``: what the folder holds; ``remedy``: what to do instead)."""
    if not path.is_file():
        write_json(path, settings)
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    changed = [key for key in settings if key != "versions" and before.get(key) != settings[key]]
    if changed:
        raise ValueError(f"{path.parent} holds {holds} with other settings ({', '.join(changed)} differ): {remedy}")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def barrier(world: int) -> None:
    """Wait for every rank, where there are several."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
