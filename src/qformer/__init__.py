"""qformer: BLIP-2 done right. The Q-Former, its losses, and the models around it.

Names are imported on first use (``qformer.Blip2`` imports transformers then), so that the
``qformer`` command starts at once and reads ``HF_HUB_OFFLINE`` before transformers does."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "Blip2": "qformer.pretrained.stage2",
    "InstructBlip": "qformer.pretrained.stage2",
    "StateDictMismatchError": "qformer.checkpoint",
    "Blip2Config": "qformer.config",
    "Blip2Stage1Config": "qformer.config",
    "ImageConfig": "qformer.config",
    "QFormerConfig": "qformer.config",
    "VisionConfig": "qformer.config",
    "Blip2Stage1": "qformer.pretrained.stage1",
    "QFormer": "qformer.pretrained.qformer",
    "QFormerCache": "qformer.models.qformer",
    "QFormerOutput": "qformer.models.qformer",
    "load_pretrained": "qformer.pretrained.auto",
    "load_tokenizer": "qformer.tokenizer",
}
__all__ = [
    "Blip2",
    "Blip2Config",
    "Blip2Stage1",
    "Blip2Stage1Config",
    "ImageConfig",
    "InstructBlip",
    "QFormer",
    "QFormerCache",
    "QFormerConfig",
    "QFormerOutput",
    "StateDictMismatchError",
    "VisionConfig",
    "load_pretrained",
    "load_tokenizer",
]

if TYPE_CHECKING:
    from qformer.checkpoint import StateDictMismatchError
    from qformer.config import Blip2Config, Blip2Stage1Config, ImageConfig, QFormerConfig, VisionConfig
    from qformer.models.qformer import QFormerCache, QFormerOutput
    from qformer.pretrained.auto import load_pretrained
    from qformer.pretrained.qformer import QFormer
    from qformer.pretrained.stage1 import Blip2Stage1
    from qformer.pretrained.stage2 import Blip2, InstructBlip
    from qformer.tokenizer import load_tokenizer


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'qformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
