"""State-dict adapters between qformer's layout and transformers' / LAVIS's / BERT's."""

from qformer.convert.rename import ConversionReport, RenameTable
from qformer.convert.qformer_layouts import (
    BERT,
    TRANSFORMERS_BLIP2_QFORMER,
    TRANSFORMERS_INSTRUCTBLIP_QFORMER,
    qformer_config_from_transformers,
    qformer_from_transformers,
    qformer_to_transformers,
)

__all__ = [
    "BERT",
    "TRANSFORMERS_BLIP2_QFORMER",
    "TRANSFORMERS_INSTRUCTBLIP_QFORMER",
    "ConversionReport",
    "RenameTable",
    "qformer_config_from_transformers",
    "qformer_from_transformers",
    "qformer_to_transformers",
]
