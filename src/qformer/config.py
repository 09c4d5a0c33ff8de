"""Typed configs. One place per default: the dataclass field defaults are BLIP-2's."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
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
    def from_dict(cls: type[T], values: dict[str, Any], where: str | None = None) -> T:
        """Build from a dict; fields typed as another config are built from nested dicts.
        Errors name a field as ``where.field`` (a recipe's ``data.batch_size``: ``where=""`` at
        its top), or as ``ClassName.field`` when ``where`` is None."""
        prefix = cls.__name__ if where is None else where
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{prefix or cls.__name__}: unknown field(s) {unknown}; known fields are {sorted(fields)}")
        nested = typing.get_type_hints(cls)
        built = {}
        for name, value in values.items():
            key = f"{prefix}.{name}" if prefix else name
            sub = _config_class(nested[name])
            if sub is not None and isinstance(value, dict):
                built[name] = sub.from_dict(value, None if where is None else key)
            else:
                built[name] = _coerce(key, nested[name], value)
        return cls(**built)

    def replace(self: T, **changes: Any) -> T:
        return type(self).from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Numbers written as text (YAML reads "3e-4" as a string) become numbers where the field
    is a number; a boolean field takes only true or false (not "yes", 1 or "nope"); anything
    else of the wrong kind is refused."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if is_union else (hint,)
    if value is not None and bool in options and not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if value is None or not any(t in (int, float) for t in options):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got {value!r}")
    if float not in options and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{key} must be a whole number, got {value!r}")
    try:
        if float in options:
            return float(value)
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None


# The most a size may be: far above any released model's (BLIP-2: a 1408-wide, 39-layer ViT on
# 224-px images, 256 image tokens, 512 text positions, 32 queries), so that a typo (a few extra
# zeros) fails in one line instead of allocating gigabytes.
MAX_WIDTH = 2**16  # hidden, intermediate and projection sizes; heads
MAX_LAYERS = 1024
MAX_TOKENS = 2**16  # position tables, image tokens, queries
MAX_VOCAB = 2**20
MAX_IMAGE_SIZE = 8192  # pixels a side


def _sizes(config: ConfigBase, **limits: int) -> None:
    """Sizes and counts of a config, each between 1 and its limit, or one line naming it."""
    for name, limit in limits.items():
        value = getattr(config, name)
        if value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be at least 1, got {value}")
        if value > limit:
            raise ValueError(f"{type(config).__name__}.{name} must be at most {limit}, got {value}")


def _dtype_field(name: str, value: Any) -> str:
    """A dtype field in any spelling (``bf16``, ``torch.bfloat16``, ...) -> ``bfloat16``."""
    from qformer.devices import dtype_name

    try:
        return dtype_name(value)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _config_class(hint: Any) -> type[ConfigBase] | None:
    """The ConfigBase subclass in a type hint such as ``VisionConfig | None``, if any."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, ConfigBase):
            return candidate
    return None


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
        _sizes(self, vocab_size=MAX_VOCAB, hidden_size=MAX_WIDTH, num_hidden_layers=MAX_LAYERS,
               num_attention_heads=MAX_WIDTH, intermediate_size=MAX_WIDTH, max_position_embeddings=MAX_TOKENS,
               encoder_hidden_size=MAX_WIDTH, cross_attention_frequency=MAX_LAYERS)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"QFormerConfig.hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
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


@dataclass
class VisionConfig(ConfigBase):
    """BLIP-2's frozen image encoder: EVA ViT-g/14 without its last block (39 of 40), all
    tokens out. Same fields and weights as transformers' ``Blip2VisionConfig``."""

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        _sizes(self, hidden_size=MAX_WIDTH, intermediate_size=MAX_WIDTH, num_hidden_layers=MAX_LAYERS,
               num_attention_heads=MAX_WIDTH, image_size=MAX_IMAGE_SIZE, patch_size=MAX_IMAGE_SIZE)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"VisionConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size ({self.image_size}) must be a multiple of patch_size "
                             f"({self.patch_size})")
        if self.num_positions - 1 > MAX_TOKENS:
            raise ValueError(f"VisionConfig.image_size {self.image_size} in patches of {self.patch_size} makes "
                             f"{self.num_positions - 1} image tokens, more than {MAX_TOKENS}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageConfig(ConfigBase):
    """Evaluation preprocessing: bicubic resize to ``size`` (224; 364 for the COCO fine-tuned
    models), scale to [0, 1], normalise with CLIP's mean and std."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        _sizes(self, size=MAX_IMAGE_SIZE)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"ImageConfig needs 3 means and 3 positive stds (RGB), got mean {self.mean}, "
                             f"std {self.std}")


@dataclass
class Blip2Stage1Config(ConfigBase):
    """BLIP-2's first stage: frozen image encoder, ``ln_vision``, learned queries, the Q-Former
    with its text path and LM head, 256-d projections, ITM head and temperature.

    ``vision`` None means image features come precomputed (width ``qformer.encoder_hidden_size``).
    ``ln_vision_eps`` is the image encoder's eps (1e-6), as transformers' layout stores one eps
    for both; LAVIS's code uses 1e-5. ``image`` is the preprocessing the model was trained with.
    """

    vision: VisionConfig | None = dataclasses.field(default_factory=VisionConfig)
    qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    num_query_tokens: int = 32
    embed_dim: int = 256
    temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    ln_vision_eps: float = 1e-6
    vision_dtype: str = "float32"
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)

    def __post_init__(self) -> None:
        _sizes(self, num_query_tokens=MAX_TOKENS, embed_dim=MAX_WIDTH)
        if self.vision is not None and self.vision.hidden_size != self.qformer.encoder_hidden_size:
            raise ValueError(
                f"the image encoder is {self.vision.hidden_size} wide but the Q-Former cross-attends to "
                f"encoder_hidden_size={self.qformer.encoder_hidden_size}"
            )
        if not self.qformer.use_text_input or not self.qformer.use_lm_head:
            raise ValueError("stage 1 needs the Q-Former's text input and LM head (ITC, ITM, ITG)")
        self.vision_dtype = _dtype_field("vision_dtype", self.vision_dtype)
        if not 0 < self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError("need 0 < min_temperature <= temperature <= max_temperature")


def _stage2_qformer() -> QFormerConfig:
    return QFormerConfig(use_text_input=False, use_lm_head=False, bos_token_id=None)


@dataclass
class Blip2Config(ConfigBase):
    """BLIP-2's second stage: frozen image encoder, ``ln_vision``, queries, the Q-Former (no
    text path), ``language_projection`` and a frozen LLM, decoder-only or encoder-decoder.

    ``text_config`` is the LLM's transformers config as a dict (with its ``model_type``).
    ``text_suffix`` ends every decoder-only caption and is a stop token for generation (BLIP-2's
    OPT models use "\\n"). ``image_token_index`` is the LLM vocabulary id that transformers'
    layout uses as the queries' placeholder; our forward needs none.
    """

    vision: VisionConfig | None = dataclasses.field(default_factory=VisionConfig)
    qformer: QFormerConfig = dataclasses.field(default_factory=_stage2_qformer)
    text_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_query_tokens: int = 32
    ln_vision_eps: float = 1e-6
    vision_dtype: str = "float32"
    llm_dtype: str = "float32"
    image_token_index: int | None = None
    text_suffix: str = "\n"
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)

    def __post_init__(self) -> None:
        _sizes(self, num_query_tokens=MAX_TOKENS)
        if self.vision is not None and self.vision.hidden_size != self.qformer.encoder_hidden_size:
            raise ValueError(
                f"the image encoder is {self.vision.hidden_size} wide but the Q-Former cross-attends to "
                f"encoder_hidden_size={self.qformer.encoder_hidden_size}"
            )
        self.vision_dtype = _dtype_field("vision_dtype", self.vision_dtype)
        self.llm_dtype = _dtype_field("llm_dtype", self.llm_dtype)
        if "model_type" not in self.text_config:
            raise ValueError("text_config must be a transformers config dict with a model_type")
