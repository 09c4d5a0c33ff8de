"""The Q-Former: BERT's LM-head model as BLIP-2 drives it.

Learned queries are prepended to the text; only query positions cross-attend to the image and
they use their own feed-forward block. Masks follow PyTorch: 1 = attend, 0 = masked.

Shapes: B batch, Q query tokens, T text tokens, L = Q + T current positions, P cached positions,
S image tokens, D hidden size, nh heads, hs head size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from qformer.checks import check_qformer_inputs
from qformer.config import QFormerConfig
from qformer.losses import causal_lm_loss

KeyValue = tuple[Tensor, Tensor]  # each (B, nh, T, hs)


@dataclass(frozen=True)
class BlockKeyValue:
    """Image keys/values (B, nh, S, hs) read by n x B query rows in blocks of B: block r reads
    image i at its row i when ``index[r]`` is None, else image ``index[r][i]``.

    Instead of a copy of the keys/values per block (kept for the backward), the blocks that read
    the images in order attend in one call, their queries side by side, and a block with an
    index gathers its keys/values again in the backward (checkpointed): the step keeps the
    images' keys/values once (stage 1's ITM rows [pos, neg image, neg text]).
    """

    key: Tensor
    value: Tensor
    index: tuple[Tensor | None, ...]

    def materialise(self) -> KeyValue:
        """Keys/values of every query row, each (n x B, nh, S, hs)."""
        parts = [(self.key, self.value) if i is None else (self.key[i], self.value[i]) for i in self.index]
        return torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts])

    def attend(self, query: Tensor, dropout: float) -> Tensor:
        """(n x B, nh, Q, hs) queries -> their context (n x B, nh, Q, hs)."""
        blocks = query.split(self.key.shape[0])  # n x (B, nh, Q, hs)
        context: list[Tensor | None] = [None] * len(blocks)
        in_order = [r for r, i in enumerate(self.index) if i is None]
        if in_order:
            side_by_side = torch.cat([blocks[r] for r in in_order], dim=2)  # (B, nh, k x Q, hs)
            out = F.scaled_dot_product_attention(side_by_side, self.key, self.value, dropout_p=dropout)
            for r, part in zip(in_order, out.split(query.shape[2], dim=2)):
                context[r] = part
        for r, i in enumerate(self.index):
            if i is not None:
                context[r] = checkpoint(_gathered_attention, blocks[r], self.key, self.value, i, dropout,
                                        use_reentrant=False)
        return torch.cat(context)


def _gathered_attention(query: Tensor, key: Tensor, value: Tensor, index: Tensor, dropout: float) -> Tensor:
    return F.scaled_dot_product_attention(query, key[index], value[index], dropout_p=dropout)


@dataclass
class QFormerCache:
    """Per-layer self-attention keys/values of the positions seen so far.

    ``query_length`` says how many of the cached positions are queries, so that text positions
    of a later pass continue from the cached text (BLIP-2's ITG starts its text at position 0
    after a cached 32-query pass).
    """

    key_values: tuple[KeyValue, ...]
    query_length: int = 0

    def __len__(self) -> int:
        return len(self.key_values)

    def __getitem__(self, layer: int) -> KeyValue:
        return self.key_values[layer]

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self.key_values)

    @property
    def length(self) -> int:
        """Number of cached positions (queries and text)."""
        return self.key_values[0][0].shape[2]

    def index_select(self, index: Tensor) -> QFormerCache:
        """Rows ``index`` of the batch: reorders beams or repeats an image's cache."""
        return QFormerCache(
            tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in self.key_values),
            self.query_length,
        )

    # What transformers' ``generate`` reads of a cache (qformer.generate decodes through it).
    is_compileable = False  # its length grows each step

    @property
    def is_linear(self) -> tuple[bool, ...]:
        return (False,) * len(self.key_values)  # softmax attention in every layer

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Keep rows ``beam_idx``, in place (beam search, each step)."""
        self.key_values = self.index_select(beam_idx).key_values


PastKeyValues = Union[QFormerCache, tuple[KeyValue, ...]]


@dataclass
class QFormerOutput:
    """Output of :class:`QFormerModel`. ``logits`` cover the text positions only."""

    last_hidden_state: Tensor
    logits: Tensor | None = None
    loss: Tensor | None = None
    past_key_values: QFormerCache | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        """(loss, logits, last_hidden_state, past_key_values, hidden_states, attentions,
        cross_attentions), leaving out what is None, as transformers does."""
        fields = (
            self.loss,
            self.logits,
            self.last_hidden_state,
            self.past_key_values,
            self.hidden_states,
            self.attentions,
            self.cross_attentions,
        )
        return tuple(f for f in fields if f is not None)


class QFormerEmbeddings(nn.Module):
    """Word + position (+ optional token-type) embeddings of the text, queries in front,
    then LayerNorm and dropout over both. Queries get no position embedding."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word: nn.Embedding | None = None
        self.position: nn.Embedding | None = None
        self.token_type: nn.Embedding | None = None
        if config.use_text_input:
            self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.type_vocab_size > 0:
                self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def embed_text(
        self,
        input_ids: Tensor | None,
        inputs_embeds: Tensor | None,
        position_ids: Tensor | None,
        token_type_ids: Tensor | None,
        first_position: int,
    ) -> Tensor:
        """(B, T) ids or (B, T, D) word embeddings -> (B, T, D), before the LayerNorm."""
        if self.word is None or self.position is None:
            raise ValueError("this Q-Former has no text input (use_text_input=False); pass query_embeds only")
        text = self.word(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(first_position, first_position + text.shape[1], device=text.device)
        text = text + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(text.shape[:2], dtype=torch.long, device=text.device)
            text = text + self.token_type(token_type_ids)
        elif token_type_ids is not None and bool(token_type_ids.ne(0).any()):
            raise ValueError(
                "token_type_ids other than 0 need a token-type table: build with "
                "QFormer.from_bert(path, keep_token_types=True) or type_vocab_size > 0"
            )
        return text

    def forward(self, query_embeds: Tensor | None, text_embeds: Tensor | None) -> Tensor:
        dtype = self.norm.weight.dtype  # queries may be kept in fp32 beside a half-precision Q-Former
        parts = [x.to(dtype) for x in (query_embeds, text_embeds) if x is not None]
        hidden = torch.cat(parts, dim=1) if len(parts) == 2 else parts[0]  # (B, L, D)
        return self.dropout(self.norm(hidden))


class Attention(nn.Module):
    """Multi-head attention with BERT's post-norm residual: norm(x + dropout(out(attn)))."""

    def __init__(self, config: QFormerConfig, key_value_width: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_value_width, config.hidden_size)
        self.value = nn.Linear(key_value_width, config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def project_key_value(self, states: Tensor) -> KeyValue:
        """(B, S, W) -> keys and values, each (B, nh, S, hs)."""
        return self.split_heads(self.key(states)), self.split_heads(self.value(states))

    def forward(
        self,
        hidden: Tensor,
        key_value: KeyValue | BlockKeyValue | None = None,
        past: KeyValue | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, KeyValue | BlockKeyValue, Tensor | None]:
        """Self-attention when ``key_value`` is None (keys/values from ``hidden``, after ``past``);
        cross-attention to precomputed ``key_value`` (or :class:`BlockKeyValue`) otherwise. Returns the block output, the
        keys/values attended to and, if asked, the attention weights (B, nh, L, P + L)."""
        batch, length, width = hidden.shape
        query = self.split_heads(self.query(hidden))  # (B, nh, L, hs)
        dropout = self.attention_dropout if self.training else 0.0
        if isinstance(key_value, BlockKeyValue):
            if mask is not None:
                raise ValueError("image keys/values in blocks take no encoder_attention_mask")
            if not need_weights:
                context = key_value.attend(query, dropout).transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
                return self.norm(hidden + self.dropout(self.out(context))), key_value, None
            key_value = key_value.materialise()
        key, value = self.project_key_value(hidden) if key_value is None else key_value
        if past is not None:
            key = torch.cat([past[0], key], dim=2)  # (B, nh, P + L, hs)
            value = torch.cat([past[1], value], dim=2)
        weights = None
        if need_weights:
            scores = query @ key.transpose(-1, -2) * self.head_dim**-0.5  # (B, nh, L, P + L)
            if is_causal:
                causal = torch.ones(length, key.shape[2], dtype=torch.bool, device=hidden.device).tril()
                scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            context = F.dropout(weights, dropout, self.training) @ value  # (B, nh, L, hs)
        else:
            context = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=is_causal
            )  # (B, nh, L, hs)
        context = context.transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
        return self.norm(hidden + self.dropout(self.out(context))), (key, value), weights


class FeedForward(nn.Module):
    """BERT's intermediate/output pair: norm(x + dropout(fc2(act(fc1(x)))))."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden + self.dropout(self.fc2_of_act(self.fc1(hidden))))

    def fc2_of_act(self, inner: Tensor) -> Tensor:
        """fc2(act(inner)). For the backward, fc2's input act(inner) is not kept but computed
        again from ``inner``, which the activation keeps anyway: one (B, L, 4D) tensor saved
        per block instead of two. The recomputed values are the same bits."""
        activated = self.act(inner)
        if not (torch.is_grad_enabled() and activated.requires_grad):
            return self.fc2(activated)
        address, size = activated.data_ptr(), activated.numel()

        def pack(saved: Tensor) -> Tensor | tuple[Tensor, torch.Size]:
            if saved.data_ptr() == address and saved.numel() == size:
                return inner, saved.shape  # fc2's input (or a view of it): recomputed from inner
            return saved

        def unpack(packed: Tensor | tuple[Tensor, torch.Size]) -> Tensor:
            if isinstance(packed, tuple):
                return self.act(packed[0]).reshape(packed[1])
            return packed

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self.fc2(activated)


class QFormerLayer(nn.Module):
    """Shared self-attention; cross-attention and the query FFN for query positions; the text
    FFN for text positions."""

    def __init__(self, config: QFormerConfig, index: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, config.hidden_size)
        self.cross_attn = (
            Attention(config, config.encoder_hidden_size) if config.has_cross_attention(index) else None
        )
        self.query_ffn = FeedForward(config)
        self.text_ffn = FeedForward(config) if config.use_text_input else None

    def forward(
        self,
        hidden: Tensor,
        query_length: int,
        self_mask: Tensor | None,
        is_causal: bool,
        past: KeyValue | None,
        image_key_value: KeyValue | BlockKeyValue | None,
        image_mask: Tensor | None,
        need_weights: bool,
    ) -> tuple[Tensor, KeyValue, Tensor | None, Tensor | None]:
        hidden, present, self_weights = self.self_attn(
            hidden, past=past, mask=self_mask, is_causal=is_causal, need_weights=need_weights
        )
        queries, text = hidden[:, :query_length], hidden[:, query_length:]  # (B, Q, D), (B, T, D)
        cross_weights = None
        if query_length > 0:
            if self.cross_attn is not None:
                if image_key_value is None:
                    raise ValueError("query positions reach a cross-attention layer: pass encoder_hidden_states")
                queries, _, cross_weights = self.cross_attn(
                    queries, key_value=image_key_value, mask=image_mask, need_weights=need_weights
                )
            queries = self.query_ffn(queries)
        if text.shape[1] > 0:
            assert self.text_ffn is not None  # the embeddings refuse text without a text path
            text = self.text_ffn(text)
        return torch.cat([queries, text], dim=1), present, self_weights, cross_weights


class QFormerLMHead(nn.Module):
    """BERT's prediction head; the decoder weight is the word-embedding matrix (tied)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        hidden = self.norm(self.act(self.dense(hidden)))
        return F.linear(hidden, word_embeddings, self.bias)  # (B, T, V)


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean "may attend" -> additive float mask for attention scores."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class QFormerModel(nn.Module):
    """BERT's ``BertLMHeadModel`` as BLIP-2 uses it (``Qformer`` and ``Qformer.bert`` in LAVIS)."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = QFormerEmbeddings(config)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_hidden_layers))
        self.lm_head = QFormerLMHead(config) if config.use_lm_head else None
        self.gradient_checkpointing = False
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                nn.init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encoder_key_values(self, encoder_hidden_states: Tensor) -> tuple[KeyValue | None, ...]:
        """Cross-attention keys/values of image features (B, S, W), one entry per layer (None
        where a layer has no cross-attention). Compute once, pass as ``encoder_key_values`` to
        every pass that reads the same image."""
        dtype = self.layers[0].self_attn.query.weight.dtype
        states = encoder_hidden_states.to(dtype)
        return tuple(
            None if layer.cross_attn is None else layer.cross_attn.project_key_value(states) for layer in self.layers
        )

    def self_attention_mask(
        self,
        attention_mask: Tensor | None,
        length: int,
        past_length: int,
        query_length: int,
        is_decoder: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[Tensor | None, bool]:
        """Additive mask over (current rows, cached + current keys), or SDPA's causal flag.

        Bidirectional: padding only. Decoder (BLIP-2's multimodal-causal mask): a query row sees
        every query, a text row sees every query and the text up to itself.
        """
        total = past_length + length
        keep = None
        if attention_mask is not None:
            if attention_mask.shape[1] == length and past_length > 0:
                cached = attention_mask.new_ones(attention_mask.shape[0], past_length)
                attention_mask = torch.cat([cached, attention_mask], dim=1)
            if attention_mask.shape[1] != total:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} positions, expected {total} "
                    f"({past_length} cached + {length} current)"
                )
            keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, P + L)
        if not is_decoder:
            return (None if keep is None else additive_mask(keep, dtype)), False
        if keep is None and query_length == 0 and past_length == 0:
            return None, True
        rows = torch.arange(past_length, total, device=device).clamp(min=query_length - 1)
        allowed = torch.arange(total, device=device)[None, :] <= rows[:, None]  # (L, P + L)
        allowed = allowed[None, None] if keep is None else allowed[None, None] & keep  # (B|1, 1, L, P + L)
        return additive_mask(allowed, dtype), False

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        query_embeds: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        encoder_key_values: tuple[KeyValue | BlockKeyValue | None, ...] | None = None,
        past_key_values: PastKeyValues | None = None,
        use_cache: bool = False,
        labels: Tensor | None = None,
        is_decoder: bool = False,
        output_logits: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> QFormerOutput | tuple:
        """Run queries (B, Q, D) and/or text (B, T) through the Q-Former.

        ``attention_mask`` (B, P + Q + T) or (B, Q + T): 1 = attend, 0 = masked. ``is_decoder``
        selects the multimodal-causal mask of ITG/generation. ``past_key_values`` come from an
        earlier pass with ``use_cache=True``. ``labels`` (B, T) give the shifted LM loss (-100
        ignored). Logits (text positions only) are computed when ``output_logits``, which
        defaults to ``is_decoder or labels is not None``.
        """
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        if query_embeds is None and input_ids is None and inputs_embeds is None:
            raise ValueError("nothing to encode: pass query_embeds, input_ids or inputs_embeds")
        if past_key_values is not None and query_embeds is not None:
            raise ValueError("query_embeds come first: with past_key_values pass only the new text")
        past = None if past_key_values is None else tuple(past_key_values)
        past_length = 0 if past is None else past[0][0].shape[2]
        past_queries = past_key_values.query_length if isinstance(past_key_values, QFormerCache) else 0
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        check_qformer_inputs(self.config.max_position_embeddings, input_ids, inputs_embeds, attention_mask,
                             query_embeds, past, None if position_ids is not None else past_length - past_queries)

        text = None
        if input_ids is not None or inputs_embeds is not None:
            text = self.embeddings.embed_text(
                input_ids, inputs_embeds, position_ids, token_type_ids, first_position=past_length - past_queries
            )  # (B, T, D)
        hidden = self.embeddings(query_embeds, text)  # (B, L, D)
        self_mask, is_causal = self.self_attention_mask(
            attention_mask,
            hidden.shape[1],
            past_length,
            past_queries + query_length,
            is_decoder,
            hidden.dtype,
            hidden.device,
        )

        if query_length > 0 and encoder_key_values is None and encoder_hidden_states is not None:
            encoder_key_values = self.encoder_key_values(encoder_hidden_states)
        image_mask = None
        if encoder_attention_mask is not None and query_length > 0:
            keep = encoder_attention_mask.to(device=hidden.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
            image_mask = additive_mask(keep, hidden.dtype)

        all_hidden = [hidden] if output_hidden_states else None
        self_weights: list[Tensor] = []
        cross_weights: list[Tensor] = []
        presents: list[KeyValue] = []
        for i, layer in enumerate(self.layers):
            args = (
                hidden,
                query_length,
                self_mask,
                is_causal,
                None if past is None else past[i],
                None if encoder_key_values is None else encoder_key_values[i],
                image_mask,
                output_attentions,
            )
            if self.gradient_checkpointing and self.training:
                hidden, present, weights, cross = checkpoint(layer, *args, use_reentrant=False)
            else:
                hidden, present, weights, cross = layer(*args)
            if use_cache:
                presents.append(present)
            if all_hidden is not None:
                all_hidden.append(hidden)
            if weights is not None:
                self_weights.append(weights)
            if cross is not None:
                cross_weights.append(cross)

        logits = loss = None
        if output_logits is None:
            output_logits = is_decoder or labels is not None
        if output_logits or labels is not None:
            if self.lm_head is None or self.embeddings.word is None:
                raise ValueError("this Q-Former has no LM head (use_lm_head=False): no logits or labels")
            logits = self.lm_head(hidden[:, query_length:], self.embeddings.word.weight)  # (B, T, V)
        if labels is not None:
            loss = causal_lm_loss(logits, labels, self.config.lm_label_smoothing)

        output = QFormerOutput(
            last_hidden_state=hidden,
            logits=logits,
            loss=loss,
            past_key_values=QFormerCache(tuple(presents), past_queries + query_length) if use_cache else None,
            hidden_states=None if all_hidden is None else tuple(all_hidden),
            attentions=tuple(self_weights) if output_attentions else None,
            cross_attentions=tuple(cross_weights) if output_attentions else None,
        )
        return output if return_dict else output.to_tuple()
