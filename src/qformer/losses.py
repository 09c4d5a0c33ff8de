"""Losses, fed with model outputs (never with raw batches or a tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qformer.collectives import Group, global_mean

IGNORE_INDEX = -100


def causal_lm_token_losses(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Per-token next-token cross-entropy, summed, and the number of tokens counted.

    Position t predicts label t + 1; ``IGNORE_INDEX`` is skipped. logits (B, T, V), labels (B, T)
    aligned with the inputs (not shifted by the caller).
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the text positions {tuple(logits.shape[:2])}")
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B * (T - 1), V)
    targets = labels[:, 1:].reshape(-1).to(shifted.device)  # (B * (T - 1),)
    total = F.cross_entropy(
        shifted.float(), targets, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum"
    )
    return total, (targets != IGNORE_INDEX).sum()


def causal_lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, group: Group = None) -> Tensor:
    """Mean next-token cross-entropy over every counted token of the (global) batch."""
    return global_mean(*causal_lm_token_losses(logits, labels, label_smoothing), group)


def positives_mask(
    rows: int,
    columns: int,
    row_offset: int,
    row_ids: Tensor | None = None,
    column_ids: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """(rows, columns) True where a local row and a global column are the same image: the
    diagonal at ``row_offset`` (this rank's place in the global batch), plus equal image ids."""
    diagonal = torch.arange(columns, device=device)[None, :] == (torch.arange(rows, device=device) + row_offset)[:, None]
    if row_ids is None or column_ids is None:
        return diagonal
    return diagonal | (row_ids[:, None] == column_ids[None, :]).to(device)


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, positives: Tensor, label_smoothing: float, group: Group) -> Tensor:
    """Image-text contrastive loss over local rows and global columns.

    sim_i2t (B, N), sim_t2i (B, N): similarities / temperature of local images to all texts and
    local texts to all images; positives (B, N) as :func:`positives_mask`. The targets spread
    evenly over the positives (one-hot without image ids), smoothed by ``label_smoothing``.
    """
    targets = positives.float() / positives.sum(dim=1, keepdim=True)  # (B, N)
    i2t = F.cross_entropy(sim_i2t.float(), targets, label_smoothing=label_smoothing, reduction="sum")
    t2i = F.cross_entropy(sim_t2i.float(), targets, label_smoothing=label_smoothing, reduction="sum")
    rows = torch.tensor(sim_i2t.shape[0], device=sim_i2t.device)
    return global_mean((i2t + t2i) / 2, rows, group)


@dataclass
class HardNegatives:
    """For each local pair, the global index of a negative image (for its text) and of a
    negative text (for its image); ``valid`` is False for a row that has no negative at all."""

    image: Tensor  # (B,) long
    text: Tensor  # (B,) long
    valid: Tensor  # (B,) bool


def sample_from_logits(logits: Tensor, allowed: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row drawn from softmax(logits) over ``allowed`` entries (Gumbel-max: all rows
    at once, no host sync). NaN counts as very unlikely, +inf as certain."""
    logits = torch.nan_to_num(logits.detach().float(), nan=-1e4, posinf=1e4, neginf=-1e4)
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(min=1e-20)
    gumbel = -torch.log(-torch.log(uniform))
    return (logits + gumbel).masked_fill(~allowed, float("-inf")).argmax(dim=1)


def sample_hard_negatives(
    sim_i2t: Tensor, sim_t2i: Tensor, positives: Tensor, generator: torch.Generator | None = None
) -> HardNegatives:
    """BLIP-2's hard negatives: for each text an image, for each image a text, drawn from the
    softmax of the similarities with positives (and same-image pairs) excluded."""
    allowed = ~positives
    return HardNegatives(
        image=sample_from_logits(sim_t2i, allowed, generator),
        text=sample_from_logits(sim_i2t, allowed, generator),
        valid=allowed.any(dim=1),
    )


def itm_loss(logits: Tensor, valid_negatives: Tensor, group: Group) -> Tensor:
    """ITM cross-entropy over [pos; neg image; neg text] rows (3B, 2); rows whose negative does
    not exist are left out."""
    batch = valid_negatives.shape[0]
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
    weights = torch.cat([torch.ones_like(valid_negatives), valid_negatives, valid_negatives]).float()
    losses = F.cross_entropy(logits.float(), labels, reduction="none")  # (3B,)
    return global_mean((losses * weights).sum(), weights.sum(), group)
