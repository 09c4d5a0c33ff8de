"""Tokenisation for stage 2, done in the collate step (never inside a model's forward)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from qformer.losses import IGNORE_INDEX


@dataclass
class TextBatch:
    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    labels: Tensor | None = None  # (B, T) or the decoder's (B, T')


def decoder_only_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    targets: list[str],
    suffix: str = "\n",
    max_length: int = 64,
) -> TextBatch:
    """[bos prompt target suffix] per row, right-padded; labels are the target and suffix only
    (-100 on the prompt and the padding). The prompt may differ per row.

    BLIP-2 appends "\\n" to OPT captions; for other LLMs pass their eos text as ``suffix``.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets")
    rows, label_rows = [], []
    for prompt, target in zip(prompts, targets):
        prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
        target_ids = tokenizer(target + suffix, add_special_tokens=False).input_ids
        ids = (prompt_ids + target_ids)[:max_length]
        rows.append(ids)
        label_rows.append(([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:max_length])
    return _pad(rows, label_rows, tokenizer.pad_token_id)


def encoder_decoder_batch(
    tokenizer: PreTrainedTokenizerBase, inputs: list[str], outputs: list[str], max_length: int = 64
) -> TextBatch:
    """Encoder text (``input_ids``) and decoder targets (``labels``, eos included, -100 on pad)."""
    encoded = tokenizer(inputs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    decoded = tokenizer(outputs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = decoded.input_ids.masked_fill(decoded.attention_mask == 0, IGNORE_INDEX)
    return TextBatch(encoded.input_ids, encoded.attention_mask, labels)


def prefix_lm_split(caption: str, rng: random.Random) -> tuple[str, str]:
    """BLIP-2's prefix-LM objective for caption-only data and an encoder-decoder LLM: the
    caption cut at a random word boundary into the encoder's prefix and the decoder's target
    (the target keeps at least one word; a one-word caption is all target)."""
    words = caption.split()
    if len(words) < 2:
        return "", caption.strip()
    cut = rng.randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def _pad(rows: list[list[int]], label_rows: list[list[int]], pad_id: int | None) -> TextBatch:
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, : len(label)] = torch.tensor(label)
    return TextBatch(ids, mask, labels)
