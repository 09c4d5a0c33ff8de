"""Typed configs. One place per default: the dataclass field defaults are BLIP-2's."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="ConfigBase")


@dataclass
class ConfigBase:
    """JSON round trip with a clear error on unknown fields."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], values: dict[str, Any]) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def replace(self: T, **changes: Any) -> T:
        return type(self).from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class QFormerConfig(ConfigBase):
    """The Q-Former: BERT-base with cross-attention to image features, as in BLIP-2.

    The vocabulary is bert-base-uncased's 30522 tokens plus BLIP-2's ``[DEC]`` bos token (30522).
    ``use_text_input`` keeps the text path (word/position embeddings and the text FFN); a stage-2
    Q-Former drops it. ``use_lm_head`` keeps the tied LM head used by image-grounded generation.
    ``type_vocab_size`` is 0 in BLIP-2 (no token-type table); ``from_bert`` can keep BERT's.
    """

    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int | None = 30522
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_text_input: bool = True
    use_lm_head: bool = True
    lm_label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ValueError(f"bos_token_id {self.bos_token_id} is outside the vocabulary (size {self.vocab_size})")
        if self.use_lm_head and not self.use_text_input:
            raise ValueError("use_lm_head needs use_text_input (the LM head is tied to the word embeddings)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer: int) -> bool:
        """BLIP-2 puts cross-attention in layers where ``layer % cross_attention_frequency == 0``."""
        return layer % self.cross_attention_frequency == 0
