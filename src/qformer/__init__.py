"""qformer: BLIP-2 done right. The Q-Former, its losses, and the models around it."""

from qformer.checkpoint import StateDictMismatchError
from qformer.config import QFormerConfig
from qformer.models.qformer import QFormer, QFormerCache, QFormerOutput
from qformer.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "QFormer",
    "QFormerCache",
    "QFormerConfig",
    "QFormerOutput",
    "StateDictMismatchError",
    "load_tokenizer",
]
