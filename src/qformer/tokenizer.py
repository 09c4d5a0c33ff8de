"""The Q-Former's tokenizer: BERT's, plus BLIP-2's ``[DEC]`` bos token; tokenizers read from
and written beside a model's weights."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DEC_TOKEN = "[DEC]"

# The arguments of one tokenizing call, not properties of the tokenizer. transformers' processors
# (Blip2Processor among them) take any of them found in a tokenizer's init_kwargs as the default of
# every call (the text kwargs of transformers.processing_utils.TextKwargs, named here because
# importing that module costs seconds), and a fast tokenizer read from a tokenizer.json that
# truncates or pads puts max_length, stride, truncation_strategy and pad_to_multiple_of there.
# padding_side and truncation_side stay: they are the tokenizer's own, which a call may override.
CALL_KWARGS = frozenset({
    "add_special_tokens", "padding", "truncation", "truncation_strategy", "max_length", "stride",
    "pad_to_multiple_of", "is_split_into_words", "return_tensors", "return_token_type_ids",
    "return_attention_mask", "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping",
    "return_length",
})


def load_tokenizer(path: str | Path, truncation_side: str = "right") -> PreTrainedTokenizerBase:
    """A BERT tokenizer from a local directory or hub id, with ``[DEC]`` as its bos token
    (id = the BERT vocabulary size, e.g. 30522 for bert-base-uncased)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), truncation_side=truncation_side)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer


def tokenize_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, padding_side: str, padding: str = "longest"
) -> BatchEncoding:
    """Padded to the longest text (or to ``max_length``), truncated to ``max_length``:
    input_ids and attention_mask (B, T). Every Q-Former text of training and inference is
    tokenised here, so that they agree."""
    return tokenizer(
        texts,
        padding=padding,
        truncation=True,
        max_length=max_length,
        padding_side=padding_side,
        return_tensors="pt",
    )


def directory_tokenizer(directory: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved in a model directory, if it has one."""
    if not (directory / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def without_call_state(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of ``tokenizer`` that remembers no tokenizing call, the caller's left as it was.

    A fast tokenizer's backend keeps the truncation and padding of its last call (and of the
    tokenizer.json it was read from), and save_pretrained writes them into tokenizer.json, where a
    plain ``tokenizers`` client applies them to every text; the call's arguments in init_kwargs go
    into tokenizer_config.json, where a processor takes them as its defaults (a ``max_length``
    without ``num_query_tokens`` makes Blip2Processor fail). What the tokenizer is stays:
    model_max_length, padding and truncation sides, special and added tokens."""
    clean = copy.deepcopy(tokenizer)
    if isinstance(clean, PreTrainedTokenizerFast):
        clean.backend_tokenizer.no_truncation()
        clean.backend_tokenizer.no_padding()
    for name in CALL_KWARGS:
        clean.init_kwargs.pop(name, None)
    return clean


def save_tokenizer(tokenizer: PreTrainedTokenizerBase | None, directory: Path) -> None:
    """Tokenizer files written beside the weights without any past call's state (see
    :func:`without_call_state`), each moved into place whole."""
    if tokenizer is None:
        return
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        for name in without_call_state(tokenizer).save_pretrained(tmp):
            os.replace(name, directory / Path(name).name)
