"""Matmul FLOPs of the Q-Former's passes and of BLIP-2's stage-1 step, by formula (for MFU).

What is counted: every matrix product (linear layers, attention scores and context, the LM
head, the ITC similarities, the projection and ITM heads), 2 FLOPs per multiply-add, masks not
exploited (SDPA computes the full score rectangle). What is left out: softmax, LayerNorm, GELU,
dropout, additions, embeddings and the losses; ``torch.utils.flop_counter.FlopCounterMode``
leaves them out too, and ``tests/test_flops.py`` checks these formulas against it on the real
modules.

Backward convention: a matmul's backward costs 2x its forward (the gradient of its input and of
its weight), except where its input needs no gradient (image features fed straight to the
cross-attention keys/values, as in a frozen-encoder Q-Former pass): then only the weight's, 1x.
This is what autograd runs. The FLOPs depend on sizes only, so a trainer can log MFU from them.

Sizes: B batch, Q queries, T text tokens, P cached positions, S image tokens, W image width,
D hidden, F FFN width, V vocabulary, E embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

from qformer.config import QFormerConfig


@dataclass(frozen=True)
class Flops:
    """Forward and backward matmul FLOPs."""

    forward: int = 0
    backward: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, times: int) -> Flops:
        return Flops(self.forward * times, self.backward * times)


def matmul(rows: int, inner: int, columns: int, input_grad: bool = True) -> Flops:
    """(rows, inner) @ (inner, columns) and its backward (see the module's convention)."""
    forward = 2 * rows * inner * columns
    return Flops(forward, forward * (2 if input_grad else 1))


def qformer_pass(
    config: QFormerConfig,
    batch: int,
    queries: int = 0,
    text: int = 0,
    past: int = 0,
    image_tokens: int = 0,
    project_image: bool = True,
    image_grad: bool = True,
    lm_head: bool = False,
) -> Flops:
    """One Q-Former pass over ``queries`` + ``text`` current positions after ``past`` cached ones.

    Query positions cross-attend to ``image_tokens`` in the cross-attention layers; the image's
    keys/values are projected here when ``project_image`` (else they were computed once and are
    shared), from features that need a gradient when ``image_grad``. ``lm_head``: logits over the
    text positions.
    """
    d, f = config.hidden_size, config.intermediate_size
    rows = batch * (queries + text)  # every current position
    layer = (
        matmul(rows, d, d) * 4  # self-attention query, key, value, output
        + matmul(batch * (queries + text), d, past + queries + text) * 2  # scores, context (summed over heads)
        + matmul(rows, d, f)  # FFN in (query FFN for queries, text FFN for text)
        + matmul(rows, f, d)  # FFN out
    )
    cross = Flops()
    if queries > 0:
        cross = matmul(batch * queries, d, d) * 2 + matmul(batch * queries, d, image_tokens) * 2  # q, out; scores, ctx
        if project_image:
            cross = cross + matmul(batch * image_tokens, config.encoder_hidden_size, d, image_grad) * 2  # key, value
    cross_layers = sum(config.has_cross_attention(i) for i in range(config.num_hidden_layers))
    total = layer * config.num_hidden_layers + cross * cross_layers
    if lm_head and text > 0:
        total = total + matmul(batch * text, d, d) + matmul(batch * text, d, config.vocab_size)  # dense, decoder
    return total


def image_key_values(config: QFormerConfig, batch: int, image_tokens: int, image_grad: bool = True) -> Flops:
    """Projecting ``batch`` images' features to every cross-attention layer's keys and values."""
    cross_layers = sum(config.has_cross_attention(i) for i in range(config.num_hidden_layers))
    return matmul(batch * image_tokens, config.encoder_hidden_size, config.hidden_size, image_grad) * (2 * cross_layers)


def stage1_step(
    config: QFormerConfig, batch: int, text: int, queries: int, image_tokens: int, embed_dim: int,
    shared_image_kv: bool = True,
) -> Flops:
    """The stage-1 step from image features (ITC + ITM + ITG, forward + backward), one process.

    ``shared_image_kv``: the image's keys/values are projected once per image and read by the
    query pass and the three ITM rows (:class:`qformer.objective.Stage1Objective`); otherwise every
    pass projects its own (the ITC query pass B images, the ITM pass 3B), as LAVIS does.
    """
    d, q = config.hidden_size, queries
    multimodal = dict(queries=q, text=text, image_tokens=image_tokens, project_image=not shared_image_kv)
    passes = (
        qformer_pass(config, batch, queries=q, image_tokens=image_tokens, project_image=not shared_image_kv)  # ITC image
        + qformer_pass(config, batch, text=text)  # ITC text
        + qformer_pass(config, 3 * batch, **multimodal)  # ITM [pos, neg image, neg text]
        + qformer_pass(config, batch, text=text, past=q, lm_head=True)  # ITG over the cached queries
    )
    heads = (
        matmul(batch * q, d, embed_dim)  # vision_proj
        + matmul(batch, d, embed_dim)  # text_proj ([CLS])
        + matmul(batch * q, embed_dim, batch) * 2  # similarities i2t and t2i
        + matmul(3 * batch * q, d, 2)  # ITM head
    )
    shared = image_key_values(config, batch, image_tokens) if shared_image_kv else Flops()
    return passes + heads + shared
