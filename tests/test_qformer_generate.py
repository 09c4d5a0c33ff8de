"""Q-Former captions through transformers' generate: LAVIS's own captions reproduced token for
token (tests/data/lavis_qformer_captions, made by LAVIS's code; its make.py says how), and the
query pass run once per image."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qformer.generate import DecodingOptions, qformer_generate
from qformer.pretrained.stage1 import Blip2Stage1
from stage1_helpers import tiny_stage1_config

pytestmark = pytest.mark.numerics  # parity and promised equalities: tests/numerics_sweep.py

FIXTURE = Path(__file__).parent / "data" / "lavis_qformer_captions"
CASES = json.loads((FIXTURE / "cases.json").read_text())


@pytest.fixture(scope="module")
def lavis_weights():
    weights = load_file(FIXTURE / "weights.safetensors")
    embeds = weights.pop("image_embeds")
    model = Blip2Stage1(tiny_stage1_config(vision=False)).eval()
    model.qformer.load_state_dict({k.removeprefix("qformer."): v for k, v in weights.items() if k != "query_tokens"})
    with torch.no_grad():
        model.query_tokens.copy_(weights["query_tokens"])
    return model, embeds


def lavis_options(case: dict) -> dict:
    """LAVIS's generate arguments -> ours: its lengths count the [DEC] token."""
    options = {k: v for k, v in case.items() if k not in ("max_length", "min_length", "seed")}
    return options | {"max_new_tokens": case["max_length"] - 1, "min_new_tokens": case["min_length"] - 1}


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: ",".join(f"{k}={v}" for k, v in c["options"].items()))
def test_captions_equal_lavis(lavis_weights, case):
    model, embeds = lavis_weights
    queries = model.queries(len(embeds))
    if "seed" in case["options"]:
        torch.manual_seed(case["options"]["seed"])
    tokens = qformer_generate(model.qformer, queries, model.qformer.encoder_key_values(embeds), CASES["eos"],
                              CASES["pad"], **lavis_options(case["options"]))
    assert tokens.tolist() == [row[1:] for row in case["tokens"]]  # LAVIS's start with [DEC]


def test_the_fixture_has_captions_of_every_kind():
    """Ended by eos at many lengths and by the length limit: beam bookkeeping is exercised."""
    ends = {row.index(CASES["eos"]) if CASES["eos"] in row else None for case in CASES["cases"] for row in case["tokens"]}
    assert None in ends and len(ends - {None}) >= 8


def test_queries_run_once_per_image_then_one_token_per_beam_row(lavis_weights):
    model, embeds = lavis_weights
    calls = []
    hook = model.qformer.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((kwargs.get("query_embeds") is not None,
                                              (kwargs.get("query_embeds") if kwargs.get("input_ids") is None
                                               else kwargs["input_ids"]).shape[:2])), with_kwargs=True)
    try:
        qformer_generate(model.qformer, model.queries(3), model.qformer.encoder_key_values(embeds[:3]), CASES["eos"],
                         options=DecodingOptions(num_beams=4, max_new_tokens=5))
    finally:
        hook.remove()
    assert calls[0] == (True, (3, 4))  # the queries, once per image
    assert all(call == (False, (12, 1)) for call in calls[1:]) and 1 < len(calls) <= 6


def test_options_refused_in_one_line(lavis_weights):
    model, embeds = lavis_weights
    image_kv = model.qformer.encoder_key_values(embeds[:1])
    with pytest.raises(ValueError, match="use_cache"):
        qformer_generate(model.qformer, model.queries(1), image_kv, CASES["eos"], use_cache=False)
    with pytest.raises(ValueError, match="num_return_sequences"):
        DecodingOptions(num_beams=2, num_return_sequences=3)
