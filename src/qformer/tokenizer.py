"""The Q-Former's tokenizer: BERT's, plus BLIP-2's ``[DEC]`` bos token."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"


def load_tokenizer(path: str | Path, truncation_side: str = "right") -> PreTrainedTokenizerBase:
    """A BERT tokenizer from a local directory or hub id, with ``[DEC]`` as its bos token
    (id = the BERT vocabulary size, e.g. 30522 for bert-base-uncased)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), truncation_side=truncation_side)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer
