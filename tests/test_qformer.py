"""The Q-Former's own behaviour: masks, cache, gradients, outputs, errors, checkpoints."""

import os
import stat

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config, tiny_qformer
from torch.testing import assert_close

from qformer import QFormer, QFormerCache, StateDictMismatchError

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

B, Q, T, S = 2, 4, 6, 5


def inputs(config, text_len=T):
    ids = torch.randint(1, config.vocab_size, (B, text_len))
    queries = torch.randn(B, Q, config.hidden_size)
    image = torch.randn(B, S, config.encoder_hidden_size)
    return ids, queries, image


def ones(*shape):
    return torch.ones(*shape, dtype=torch.long)


# ---------------------------------------------------------------- masks


def test_bidirectional_padding_mask_hides_padded_text():
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    mask = ones(B, Q + T)
    mask[:, -2:] = 0  # the last two text tokens are padding
    kwargs = dict(query_embeds=queries, encoder_hidden_states=image, attention_mask=mask)
    out = model(input_ids=ids, **kwargs).last_hidden_state
    changed = ids.clone()
    changed[:, -2:] = (changed[:, -2:] + 7) % model.config.vocab_size
    out2 = model(input_ids=changed, **kwargs).last_hidden_state
    assert_close(out[:, : Q + T - 2], out2[:, : Q + T - 2])
    # without the mask the same change reaches every position (the test can fail)
    out3 = model(input_ids=changed, query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    assert not torch.allclose(out3[:, :Q], out[:, :Q])


def test_bidirectional_queries_see_text():
    """ITM's pass: query outputs depend on the text, text outputs on the image."""
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    out = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    changed = ids.clone()
    changed[:, -1] += 1
    out2 = model(input_ids=changed, query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    assert not torch.allclose(out[:, :Q], out2[:, :Q])
    out3 = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image + 1).last_hidden_state
    assert not torch.allclose(out[:, Q:], out3[:, Q:])


def test_unimodal_passes_equal_masked_joint_pass():
    """Query-only (ITC image side) and text-only (ITC text side) passes equal a joint pass whose
    mask hides the other modality."""
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    query_only = model(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    text_only = model(input_ids=ids).last_hidden_state
    hide_text = torch.cat([ones(B, Q), torch.zeros(B, T, dtype=torch.long)], dim=1)
    joint = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, attention_mask=hide_text)
    assert_close(joint.last_hidden_state[:, :Q], query_only, rtol=1e-5, atol=1e-5)
    assert query_only.shape == (B, Q, model.config.hidden_size)
    assert text_only.shape == (B, T, model.config.hidden_size)
    # text alone never reads the image: the same output with and without image features
    assert_close(model(input_ids=ids, encoder_hidden_states=image + 3).last_hidden_state, text_only)


def test_decoder_mask_is_multimodal_causal():
    """ITG: queries see only queries; text sees all queries and earlier text."""
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    kwargs = dict(query_embeds=queries, encoder_hidden_states=image, is_decoder=True)
    out = model(input_ids=ids, **kwargs).last_hidden_state
    for t in range(T):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 5) % model.config.vocab_size
        out2 = model(input_ids=changed, **kwargs).last_hidden_state
        assert_close(out2[:, : Q + t], out[:, : Q + t])  # queries and earlier text unchanged
        assert not torch.allclose(out2[:, Q + t], out[:, Q + t])
    # queries see each other in both directions: the last query reaches the first
    later = queries.clone()
    later[:, -1] += torch.randn_like(later[:, -1])
    out_q = model(input_ids=ids, query_embeds=later, encoder_hidden_states=image, is_decoder=True)
    assert not torch.allclose(out_q.last_hidden_state[:, 0], out[:, 0])
    # every text position reads the queries (and through them the image)
    out3 = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image * 2, is_decoder=True)
    assert not torch.allclose(out3.last_hidden_state[:, Q], out[:, Q])


def test_text_only_decoder_uses_causal_flag_and_padding():
    model = tiny_qformer()
    ids, _, _ = inputs(model.config)
    causal = model(input_ids=ids, is_decoder=True).last_hidden_state
    with_mask = model(input_ids=ids, attention_mask=ones(B, T), is_decoder=True).last_hidden_state
    assert_close(causal, with_mask)
    changed = ids.clone()
    changed[:, -1] += 1
    assert_close(model(input_ids=changed, is_decoder=True).last_hidden_state[:, :-1], causal[:, :-1])


def test_image_mask_hides_masked_image_tokens():
    model = tiny_qformer()
    _, queries, image = inputs(model.config)
    image_mask = ones(B, S)
    image_mask[:, -2:] = 0
    out = model(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=image_mask)
    changed = image.clone()
    changed[:, -2:] += 10
    out2 = model(query_embeds=queries, encoder_hidden_states=changed, encoder_attention_mask=image_mask)
    assert_close(out.last_hidden_state, out2.last_hidden_state)
    out3 = model(query_embeds=queries, encoder_hidden_states=changed)
    assert not torch.allclose(out3.last_hidden_state, out.last_hidden_state)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_sdpa_equals_explicit_attention(is_decoder):
    """The weights path (output_attentions) is plain softmax(QK^T)V: SDPA must agree."""
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    mask = ones(B, Q + T)
    mask[0, -1] = 0
    kwargs = dict(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, attention_mask=mask)
    fast = model(**kwargs, is_decoder=is_decoder)
    slow = model(**kwargs, is_decoder=is_decoder, output_attentions=True)
    assert_close(fast.last_hidden_state, slow.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert len(slow.attentions) == model.config.num_hidden_layers
    assert len(slow.cross_attentions) == 2  # layers 0 and 2
    weights = slow.attentions[0]  # (B, nh, L, L)
    assert weights.shape == (B, model.config.num_attention_heads, Q + T, Q + T)
    assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert (weights[0, :, :, -1] == 0).all()  # the padded key gets no weight
    if is_decoder:
        assert (weights[:, :, :Q, Q:] == 0).all()  # queries never look at text
    assert slow.cross_attentions[0].shape == (B, model.config.num_attention_heads, Q, S)


# ---------------------------------------------------------------- cache


def test_itg_with_cached_query_pass_equals_full_pass():
    """BLIP-2's ITG: the query pass (use_cache) feeds the text pass through past_key_values."""
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    text_mask = ones(B, T)
    text_mask[1, -2:] = 0
    labels = ids.masked_fill(text_mask == 0, -100)
    full = model(
        input_ids=ids,
        query_embeds=queries,
        encoder_hidden_states=image,
        attention_mask=torch.cat([ones(B, Q), text_mask], 1),
        is_decoder=True,
        labels=labels,
    )
    query_pass = model(query_embeds=queries, encoder_hidden_states=image, use_cache=True)
    cache = query_pass.past_key_values
    assert isinstance(cache, QFormerCache) and cache.query_length == Q and cache.length == Q
    assert cache[0][0].shape == (B, model.config.num_attention_heads, Q, model.config.head_dim)
    text_pass = model(
        input_ids=ids,
        attention_mask=torch.cat([ones(B, Q), text_mask], 1),
        past_key_values=cache,
        is_decoder=True,
        labels=labels,
    )
    assert_close(text_pass.logits, full.logits, rtol=1e-5, atol=1e-5)
    assert_close(text_pass.loss, full.loss)
    assert_close(query_pass.last_hidden_state, full.last_hidden_state[:, :Q], rtol=1e-5, atol=1e-5)
    # a mask covering only the new tokens means "the cache is all attended"
    short = model(input_ids=ids, past_key_values=cache, is_decoder=True, attention_mask=ones(B, T))
    long = model(input_ids=ids, past_key_values=cache, is_decoder=True, attention_mask=ones(B, Q + T))
    assert_close(short.logits, long.logits)


def test_incremental_decoding_equals_full_pass():
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    full = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, is_decoder=True)
    cache = model(query_embeds=queries, encoder_hidden_states=image, use_cache=True).past_key_values
    step_logits = []
    for t in range(T):
        step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, is_decoder=True, use_cache=True)
        cache = step.past_key_values
        step_logits.append(step.logits)
    assert cache.length == Q + T and cache.query_length == Q
    assert_close(torch.cat(step_logits, dim=1), full.logits, rtol=1e-5, atol=1e-5)
    # reordering the cache (beam search) reorders the next step
    swapped = cache.index_select(torch.tensor([1, 0]))
    nxt = model(input_ids=ids[:, :1], past_key_values=cache, is_decoder=True).logits
    nxt_swapped = model(input_ids=ids[[1, 0], :1], past_key_values=swapped, is_decoder=True).logits
    assert_close(nxt_swapped, nxt[[1, 0]])


def test_plain_tuple_cache_counts_positions_as_text():
    model = tiny_qformer()
    ids, _, _ = inputs(model.config)
    full = model(input_ids=ids, is_decoder=True)
    first = model(input_ids=ids[:, :3], is_decoder=True, use_cache=True)
    legacy = tuple(first.past_key_values)  # ((k, v), ...) as transformers' legacy caches
    rest = model(input_ids=ids[:, 3:], past_key_values=legacy, is_decoder=True)
    assert_close(rest.logits, full.logits[:, 3:], rtol=1e-5, atol=1e-5)


def test_shared_image_key_values_equal_recomputed():
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    kv = model.encoder_key_values(image)
    assert [x is None for x in kv] == [False, True, False]
    a = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    b = model(input_ids=ids, query_embeds=queries, encoder_key_values=kv).last_hidden_state
    assert_close(a, b)


# ---------------------------------------------------------------- loss, gradients, outputs


def test_lm_loss_is_shifted_smoothed_and_ignores_minus_100():
    model = tiny_qformer(lm_label_smoothing=0.1)
    ids, queries, image = inputs(model.config)
    labels = ids.clone()
    labels[0, 3:] = -100
    out = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, is_decoder=True, labels=labels)
    assert out.logits.shape == (B, T, model.config.vocab_size)
    # by hand: position t predicts token t + 1; label smoothing spreads 0.1 over the vocabulary
    logp = out.logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    smooth = -logp.mean(-1)
    expected = ((0.9 * nll + 0.1 * smooth) * keep).sum() / keep.sum()
    assert_close(out.loss, expected)


def test_label_smoothing_zero_is_plain_cross_entropy():
    model = tiny_qformer(lm_label_smoothing=0.0)
    ids, _, _ = inputs(model.config)
    out = model(input_ids=ids, is_decoder=True, labels=ids)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
    assert_close(out.loss, expected)


def test_every_trainable_parameter_gets_a_gradient():
    model = QFormer(tiny_config(type_vocab_size=2)).train()
    ids, queries, image = inputs(model.config)
    queries.requires_grad_(True)
    itm = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, token_type_ids=torch.ones_like(ids))
    itg = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, is_decoder=True, labels=ids)
    (itm.last_hidden_state.pow(2).mean() + itg.loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert queries.grad is not None and queries.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_same_output_and_gradients():
    model = tiny_qformer(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    ids, queries, image = inputs(model.config)

    def run():
        model.zero_grad()
        out = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, is_decoder=True, labels=ids)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = run()
    model.gradient_checkpointing = True
    loss_ckpt, grads_ckpt = run()
    assert_close(loss_ckpt, loss)
    for name in grads:
        assert_close(grads_ckpt[name], grads[name], msg=name)


def test_feed_forward_recomputes_its_activation_with_the_same_bits():
    """The FFN keeps fc1's output alone and computes act(fc1(x)) again in the backward."""
    from qformer.models.qformer import FeedForward

    block = FeedForward(tiny_config(hidden_dropout_prob=0.0)).train()
    calls = []
    activation = block.act

    class Counted(torch.nn.Module):
        def forward(self, x):
            calls.append(torch.is_grad_enabled())
            return activation(x)

    block.act = Counted()
    x = torch.randn(2, 5, block.fc1.in_features, requires_grad=True)

    def grads(forward):
        block.zero_grad()
        x.grad = None
        out = forward(x)
        out.pow(2).sum().backward()
        return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters()]

    plain = grads(lambda h: block.norm(h + block.fc2(activation(block.fc1(h)))))
    ours = grads(block)
    assert calls == [True, False]  # once in the forward, once more in the backward
    for got, expected in zip(ours, plain, strict=True):
        assert torch.equal(got, expected)
    calls.clear()
    with torch.no_grad():
        block(x)
    assert calls == [False]  # nothing kept, nothing recomputed


def test_return_dict_false_gives_tuple_and_hidden_states():
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    out = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, is_decoder=True, labels=ids,
                use_cache=True, output_hidden_states=True)
    tup = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, is_decoder=True, labels=ids,
                use_cache=True, output_hidden_states=True, return_dict=False)
    loss, logits, last, cache, hidden = tup
    assert_close(loss, out.loss)
    assert_close(logits, out.logits)
    assert_close(last, out.last_hidden_state)
    assert isinstance(cache, QFormerCache)
    assert len(hidden) == model.config.num_hidden_layers + 1
    assert_close(hidden[-1], last)
    plain = model(input_ids=ids, return_dict=False)
    assert len(plain) == 1 and plain[0].shape == (B, T, model.config.hidden_size)
    # the encoder-style pass computes no logits unless asked
    assert model(input_ids=ids).logits is None
    assert model(input_ids=ids, output_logits=True).logits.shape == (B, T, model.config.vocab_size)


def test_dropout_only_in_training():
    model = tiny_qformer()
    ids, _, _ = inputs(model.config)
    assert_close(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    model.train()
    assert not torch.allclose(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


# ---------------------------------------------------------------- errors


def test_bad_input_is_refused_with_a_clear_message():
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    with pytest.raises(ValueError, match="nothing to encode"):
        model()
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, inputs_embeds=torch.randn(B, T, model.config.hidden_size))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(query_embeds=queries)
    with pytest.raises(ValueError, match="attention_mask covers 3 positions"):
        model(input_ids=ids, attention_mask=ones(B, 3))
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, labels=ids[:, :2])
    cache = model(query_embeds=queries, encoder_hidden_states=image, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="query_embeds come first"):
        model(query_embeds=queries, past_key_values=cache)
    with pytest.raises(ValueError, match="token-type table"):
        model(input_ids=ids, token_type_ids=torch.ones_like(ids))
    model(input_ids=ids, token_type_ids=torch.zeros_like(ids))  # BERT tokenizers send zeros: fine

    no_text = tiny_qformer(use_text_input=False, use_lm_head=False)
    with pytest.raises(ValueError, match="no text input"):
        no_text(input_ids=ids)
    assert not any("text_ffn" in n or "embeddings.word" in n for n, _ in no_text.named_parameters())
    no_head = tiny_qformer(use_lm_head=False)
    with pytest.raises(ValueError, match="no LM head"):
        no_head(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        tiny_config(hidden_size=30)
    with pytest.raises(ValueError, match="unknown field"):
        type(tiny_config()).from_dict({"hidden_sise": 3})


def test_inputs_embeds_equal_input_ids():
    model = tiny_qformer()
    ids, queries, image = inputs(model.config)
    a = model(input_ids=ids, query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    b = model(inputs_embeds=model.embeddings.word(ids), query_embeds=queries, encoder_hidden_states=image)
    assert_close(a, b.last_hidden_state)


# ---------------------------------------------------------------- checkpoints


def test_save_and_load_round_trip(tmp_path):
    model = tiny_qformer()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = QFormer.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    ids, queries, image = inputs(model.config)
    kwargs = dict(input_ids=ids, query_embeds=queries, encoder_hidden_states=image, is_decoder=True)
    assert_close(loaded(**kwargs).logits, model(**kwargs).logits, rtol=0, atol=0)



@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o000])
def test_a_checkpoint_has_the_modes_of_files_written_in_place(tmp_path, umask):
    """Each file saved gets 0666 less the umask, as ``open`` would give it, not mkstemp's 0600:
    a checkpoint trained by one user is read by a server or a colleague of the group."""
    old = os.umask(umask)
    try:
        tiny_qformer().save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()}
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


def test_strict_loading_names_every_bad_key():
    model = tiny_qformer()
    state = model.state_dict()
    state.pop("layers.0.self_attn.query.weight")
    state["layers.9.extra"] = torch.zeros(1)
    state["embeddings.norm.weight"] = torch.zeros(7)
    from qformer.checkpoint import load_state_dict_strict

    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_strict(tiny_qformer(), state)
    message = str(err.value)
    assert "1 missing" in message and "layers.0.self_attn.query.weight" in message
    assert "1 unexpected" in message and "layers.9.extra" in message
    assert "1 mis-shaped" in message and "embeddings.norm.weight: checkpoint (7,) vs model (32,)" in message
