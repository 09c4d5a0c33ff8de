"""Writes this folder's fixture: LAVIS's own Q-Former captions on tiny random weights.

Two steps, in two environments (their transformers versions cannot share a process):

1. ``python make.py weights`` (qformer's environment): a tiny random Q-Former with its query
   tokens and a batch of image embeddings, written as ``weights.safetensors`` (qformer's layout)
   and ``lavis.safetensors`` (LAVIS's ``Qformer.*`` keys). The end token's bias is raised and the
   position table scaled so that captions vary and end at different lengths, where beam-search
   bookkeeping matters.
2. ``PYTHONPATH=<transformers 4.33.2 (LAVIS's pin)> python make.py lavis <LAVIS's Qformer.py>``:
   LAVIS's ``BertLMHeadModel`` loads ``lavis.safetensors`` and decodes as
   ``Blip2Qformer.generate`` does (the image embeddings repeated per beam, ``[DEC]`` first,
   eos = [SEP]), writing the tokens of each case to ``cases.json``.

The fixture was made with LAVIS at 506965b9c4a18c1e565bd32acaccabe0198433f7 and transformers 4.33.2.
"""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
BOS, EOS, PAD = 49, 3, 0
EOS_BIAS, POSITION_SCALE = 2.0, 9.0  # captions of varied tokens that end at varied lengths
QUERY_TOKENS, BATCH = 4, 8
CASES = [  # LAVIS's Blip2Qformer.generate arguments, then transformers' own options on its Q-Former
    {"num_beams": 3, "max_length": 30, "min_length": 10},  # Blip2Qformer.generate's defaults
    {"num_beams": 1, "max_length": 30, "min_length": 10},
    {"num_beams": 3, "max_length": 12, "min_length": 1},
    {"num_beams": 5, "max_length": 20, "min_length": 5},
    {"num_beams": 4, "max_length": 16, "min_length": 3, "length_penalty": 0.5, "repetition_penalty": 1.3,
     "early_stopping": True},
    {"num_beams": 3, "max_length": 20, "min_length": 10, "length_penalty": -1.0, "num_return_sequences": 2},
    {"num_beams": 3, "max_length": 14, "min_length": 2, "length_penalty": 2.0},
    {"num_beams": 2, "max_length": 25, "min_length": 10},
    {"num_beams": 6, "max_length": 10, "min_length": 3, "length_penalty": 0.0},
    {"num_beams": 3, "max_length": 30, "min_length": 5, "repetition_penalty": 1.5},
    {"num_beams": 1, "max_length": 16, "min_length": 3, "do_sample": True, "top_p": 0.9, "seed": 7},
    {"num_beams": 1, "max_length": 16, "min_length": 3, "do_sample": True, "top_k": 5, "temperature": 0.7,
     "num_return_sequences": 2, "seed": 8},
]


def write_weights() -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    from qformer.convert.blip2_layouts import stage1_to_lavis
    from stage1_helpers import tiny_stage1

    model = tiny_stage1(seed=3, vision=False)
    with torch.no_grad():
        model.qformer.lm_head.bias[EOS] += EOS_BIAS
        model.qformer.embeddings.position.weight.mul_(POSITION_SCALE)
    ours = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(("qformer.", "query_tokens"))}
    image_embeds = torch.randn(BATCH, 5, model.config.qformer.encoder_hidden_size, generator=torch.Generator().manual_seed(11))
    save_file(ours | {"image_embeds": image_embeds}, HERE / "weights.safetensors")
    lavis, _ = stage1_to_lavis(model.state_dict())
    lavis = {k: v.clone() for k, v in lavis.items() if k.startswith(("Qformer.", "query_tokens"))}
    save_file(lavis | {"image_embeds": image_embeds}, HERE / "lavis.safetensors")


def lavis_captions(qformer_py: str) -> None:
    spec = importlib.util.spec_from_file_location("lavis_qformer", qformer_py)
    lavis = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lavis)
    weights = load_file(HERE / "lavis.safetensors")
    image_embeds = weights.pop("image_embeds")
    query_tokens = weights.pop("query_tokens")
    config = lavis.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, pad_token_id=PAD)
    config.encoder_width, config.add_cross_attention, config.cross_attention_freq = image_embeds.shape[-1], True, 2
    config.query_length = QUERY_TOKENS
    model = lavis.BertLMHeadModel(config).eval()
    state = {k.removeprefix("Qformer."): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert all("position_ids" in k for k in missing) and not unexpected, (missing, unexpected)
    cases = []
    for case in CASES:
        options = dict(case)
        seed = options.pop("seed", None)
        beams = 1 if options.get("do_sample") else options["num_beams"]
        embeds = image_embeds.repeat_interleave(beams, dim=0)  # as Blip2Qformer.generate
        if options.get("do_sample"):  # rows for the returned sequences, which transformers 4.26 does not expand
            embeds = embeds.repeat_interleave(options.get("num_return_sequences", 1), dim=0)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            tokens = model.generate(
                input_ids=torch.full((BATCH, 1), BOS, dtype=torch.long),
                query_embeds=query_tokens.expand(embeds.shape[0], -1, -1),
                encoder_hidden_states=embeds, encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
                eos_token_id=EOS, pad_token_id=PAD, **options)
        cases.append({"options": case, "tokens": tokens.tolist()})
    (HERE / "cases.json").write_text(json.dumps({"bos": BOS, "eos": EOS, "pad": PAD, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "weights":
        write_weights()
    else:
        lavis_captions(sys.argv[2])
