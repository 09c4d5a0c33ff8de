"""qformer: BLIP-2 done right. The Q-Former, its losses, and the models around it."""

from qformer.blip2 import Blip2, InstructBlip
from qformer.checkpoint import StateDictMismatchError
from qformer.config import Blip2Config, Blip2Stage1Config, ImageConfig, QFormerConfig, VisionConfig
from qformer.models.blip2 import Blip2Stage1
from qformer.models.qformer import QFormer, QFormerCache, QFormerOutput
from qformer.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "Blip2",
    "Blip2Config",
    "ImageConfig",
    "InstructBlip",
    "Blip2Stage1",
    "Blip2Stage1Config",
    "VisionConfig",
    "QFormer",
    "QFormerCache",
    "QFormerConfig",
    "QFormerOutput",
    "StateDictMismatchError",
    "load_tokenizer",
]
