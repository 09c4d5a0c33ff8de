"""Tiny transformers BLIP-2 models (OPT and T5) and a tiny word-level tokenizer, built here."""

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

from qformer.tokenizer import CALL_KWARGS

IMAGE = 28
QUERIES = 4
WORDS = ("a photo of cat dog red blue green two three on the mat ball question answer : what colour is it "
         "yes no sky grass tree car").split()
SPECIAL = ["<pad>", "</s>", "<unk>", "\n", "<image>"]
VOCAB = 64  # the LLM's vocabulary; ids past the words are unused
IMAGE_TOKEN = 4


def tiny_tokenizer(add_bos: bool) -> PreTrainedTokenizerFast:
    """Word-level; OPT-like (bos </s> in front, pad 0) or T5-like (eos </s> at the end)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    else:
        core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        bos_token="</s>" if add_bos else None, unk_token="<unk>")
    tokenizer.add_tokens(["\n"], special_tokens=False)
    tokenizer.add_tokens(["<image>"], special_tokens=True)  # as the released models' tokenizers have it
    return tokenizer


def tiny_blip2_config(llm: str) -> Blip2Config:
    if llm == "opt":
        text = OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                         max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1)
    elif llm == "llama":
        text = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1)
    else:
        text = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                        num_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=0,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE, patch_size=14),
        qformer_config=dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=40, encoder_hidden_size=24),
        text_config=text.to_dict(),
        num_query_tokens=QUERIES,
        image_token_index=IMAGE_TOKEN,
    )


def tiny_transformers_blip2(llm: str, seed: int = 0) -> Blip2ForConditionalGeneration:
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(tiny_blip2_config(llm)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("norm" in name.lower()):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.5 if "language_model" in name else 0.3)
    return model


def save_tiny_blip2(directory: Path, llm: str) -> Blip2ForConditionalGeneration:
    """A transformers-saved tiny BLIP-2 with tokenizer and preprocessing config."""
    model = tiny_transformers_blip2(llm)
    model.save_pretrained(directory)
    tiny_tokenizer(add_bos=llm != "t5").save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(
        '{"image_processor_type": "BlipImageProcessor", "size": {"height": 28, "width": 28}, '
        '"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}'
    )
    return model


def with_image_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """transformers' layout of the same text: the queries' placeholders in front."""
    batch = input_ids.shape[0]
    image = torch.full((batch, QUERIES), IMAGE_TOKEN, dtype=torch.long)
    return torch.cat([image, input_ids], 1), torch.cat([torch.ones(batch, QUERIES, dtype=torch.long), attention_mask], 1)


def call_state(directory: Path) -> dict:
    """What a tokenizer saved in ``directory`` remembers of past calls: tokenizer.json's
    truncation and padding (which plain ``tokenizers`` clients apply to every text) and call
    arguments in tokenizer_config.json (which processors take as their defaults). Empty when
    it was saved clean, and otherwise what a failing assertion should show."""
    core = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    state = {name: config[name] for name in sorted(CALL_KWARGS & config.keys())}
    if core.truncation is not None:
        state["tokenizer.json truncation"] = core.truncation
    if core.padding is not None:
        state["tokenizer.json padding"] = core.padding
    return state
