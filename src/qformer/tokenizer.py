"""The Q-Former's tokenizer: BERT's, plus BLIP-2's ``[DEC]`` bos token; tokenizers read from
and written beside a model's weights."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

DEC_TOKEN = "[DEC]"


def load_tokenizer(path: str | Path, truncation_side: str = "right") -> PreTrainedTokenizerBase:
    """A BERT tokenizer from a local directory or hub id, with ``[DEC]`` as its bos token
    (id = the BERT vocabulary size, e.g. 30522 for bert-base-uncased)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), truncation_side=truncation_side)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def directory_tokenizer(directory: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved in a model directory, if it has one."""
    if not (directory / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def save_tokenizer(tokenizer: PreTrainedTokenizerBase | None, directory: Path) -> None:
    """Tokenizer files written beside the weights, each moved into place whole."""
    if tokenizer is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for name in tokenizer.save_pretrained(tmp):
            os.replace(name, directory / Path(name).name)
