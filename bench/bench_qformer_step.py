"""The Q-Former and the stage-1 step: ours against transformers' Q-Former and the plain step.

- ``qformer_fwd_bwd``: one [queries; text] pass over the image, forward + backward, ours against
  transformers' ``Blip2QFormerModel`` (with its text embeddings), same weights. On CUDA ours runs
  under bf16 autocast and transformers in its default fp32, compared within bf16 tolerance.
- ``stage1_step``: :class:`qformer.objective.Stage1Objective` (ITC + ITM + ITG, image keys/values
  projected once) against ``reference_step`` of the tests (every pass projects the image again,
  as LAVIS does), forward + backward from image features, the same fixed hard negatives.
- ``stage1_memory``: the peak memory of that step at batch 32, each side in a fresh process
  (see :func:`step_memory`). Both sides run our modules, whose FFN recomputes its GELU in the
  backward; a third run gives the plain step on an FFN that keeps both of its activations, as
  LAVIS's and transformers' BERT layers do (``ref_kept_ffn``).

FLOPs come from :mod:`qformer.flops`; MFU is over the matmul peak measured in this process.
Dropout is off on both sides (eval mode or zero rates), so that their outputs can be compared.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
from harness import Result, matmul_peak_flops, max_abs_diff, synchronize, time_alternately  # noqa: E402

from qformer import flops  # noqa: E402
from qformer.config import Blip2Stage1Config, QFormerConfig  # noqa: E402
from qformer.losses import HardNegatives  # noqa: E402
from qformer.objective import Stage1Objective  # noqa: E402
from qformer.pretrained.stage1 import Blip2Stage1  # noqa: E402
from stage1_helpers import reference_step  # noqa: E402

QUERIES, IMAGE_TOKENS, IMAGE_WIDTH = 32, 257, 1408
# Nominal dense bf16 peaks (FLOP/s) of GPUs by a part of their name, first match wins.
NOMINAL_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


@functools.cache
def peak(device: str) -> float:
    """The matmul peak of this process: fp32 on CPU, bf16 on CUDA (a size that fills a GPU)."""
    if torch.device(device).type == "cuda":
        return matmul_peak_flops(device, torch.bfloat16, size=8192)
    return matmul_peak_flops(device, torch.float32)


def mfu_fields(model_flops: int, seconds: float, device: str) -> tuple[float, dict]:
    """MFU over the measured peak, and the extra fields (the FLOPs, the peak, on a known GPU the
    MFU over its nominal bf16 peak)."""
    measured = peak(device)
    extra = {"model_tflop": model_flops / 1e12, "peak_tflops": measured / 1e12}
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name()
        nominal = next((value for part, value in NOMINAL_BF16 if part in name), None)
        if nominal is not None:
            extra["mfu_nominal_bf16"] = model_flops / seconds / nominal
    return model_flops / seconds / measured, extra


def autocast(device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU (fp32, the issue's CPU target)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def qformer_fwd_bwd(quick: bool, device: str, bf16: bool | None = None) -> Result:
    """Ours against transformers' Blip2QFormerModel; ``bf16`` (default: on CUDA) runs ours under
    bf16 autocast against transformers in fp32."""
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

    from qformer.pretrained.qformer import load_transformers_qformer

    bf16 = torch.device(device).type == "cuda" if bf16 is None else bf16
    layers, batch, text = (2, 4, 32) if quick else (12, 8, 32)
    torch.manual_seed(0)
    config = Blip2QFormerConfig(num_hidden_layers=layers, use_qformer_text_input=True, vocab_size=30523)
    ref = Blip2QFormerModel(config).to(device).eval()  # eval: no dropout, gradients still flow
    embeddings = Blip2TextEmbeddings(config).to(device).eval()
    ours = load_transformers_qformer(ref, embeddings).to(device).eval()
    queries = (torch.randn(batch, QUERIES, 768, device=device) * 0.02).requires_grad_()
    image = torch.randn(batch, IMAGE_TOKENS, IMAGE_WIDTH, device=device)  # frozen features: no gradient
    ids = torch.randint(1000, 30000, (batch, text), device=device)
    mask = torch.ones(batch, QUERIES + text, dtype=torch.long, device=device)
    mask[: batch // 2, -4:] = 0  # some padding

    def run_ours() -> torch.Tensor:
        context = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with context:
            hidden = ours(input_ids=ids, query_embeds=queries, attention_mask=mask,
                          encoder_hidden_states=image).last_hidden_state
        return step(hidden, (ours, queries))

    def run_ref() -> torch.Tensor:
        embedded = embeddings(input_ids=ids, query_embeds=queries)
        hidden = ref(query_embeds=embedded, query_length=QUERIES, attention_mask=mask,
                     encoder_hidden_states=image).last_hidden_state
        return step(hidden, (ref, embeddings, queries))

    ours_hidden, ours_grad = run_ours(), queries.grad.clone()
    ref_hidden, ref_grad = run_ref(), queries.grad.clone()
    tolerance = dict(atol=6e-2, rtol=2e-2) if bf16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours_hidden.float(), ref_hidden, **tolerance)
    torch.testing.assert_close(ours_grad.float(), ref_grad, **tolerance, msg="gradient of the queries")
    result = Result("qformer_fwd_bwd", max_abs_diff=max(max_abs_diff(ours_hidden, ref_hidden),
                                                         max_abs_diff(ours_grad, ref_grad)))
    time_alternately(run_ours, run_ref, rounds=5 if quick else 3, device=device).into(result)
    counted = flops.qformer_pass(ours.config, batch, queries=QUERIES, text=text, image_tokens=IMAGE_TOKENS,
                                 image_grad=False)
    result.limit = 1.0  # the same FLOPs on both sides
    result.mfu, extra = mfu_fields(counted.total, result.ours_s, device)
    result.extra.update(extra, layers=layers, batch=batch, queries=QUERIES, text=text, image_tokens=IMAGE_TOKENS,
                        ours_dtype="bf16 autocast" if bf16 else "fp32", ref_dtype="fp32",
                        ref_attention=ref.config._attn_implementation, tolerance=tolerance,
                        target="speedup >= 1.0; mfu >= 0.8" + ("; aim 3x against fp32" if bf16 else ""))
    return result


def step(hidden: torch.Tensor, modules: tuple) -> torch.Tensor:
    """A loss on ``hidden`` and its backward, gradients of ``modules`` (or tensors) cleared first."""
    for item in modules:
        if isinstance(item, torch.Tensor):
            item.grad = None
        else:
            item.zero_grad(set_to_none=True)
    hidden.float().pow(2).mean().backward()
    return hidden.detach()


def stage1_setup(layers: int, batch: int, text: int, device: str, seed: int = 0):
    """The model, inputs and fixed negatives both sides share, and the two step functions (each
    returns the loss after its backward)."""
    torch.manual_seed(seed)
    config = Blip2Stage1Config(vision=None, qformer=QFormerConfig(
        num_hidden_layers=layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = Blip2Stage1(config).to(device).train()
    ids = torch.randint(1000, 30000, (batch, text), device=device)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    mask[: batch // 2, -4:] = 0  # some padding
    ids = ids.masked_fill(mask == 0, 0)
    features = torch.randn(batch, IMAGE_TOKENS, IMAGE_WIDTH, device=device)
    rows = torch.arange(batch, device=device)
    negatives = HardNegatives(torch.roll(rows, 1), torch.roll(rows, 2), torch.ones(batch, dtype=torch.bool, device=device))
    objective = Stage1Objective(model)

    def ours() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with autocast(device):
            loss = objective(ids, mask, image_features=features, negatives=negatives).loss
        loss.backward()
        return loss.detach()

    def reference() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with autocast(device):
            loss = sum(reference_step(model, ids, mask, features, negatives.image, negatives.text))
        loss.backward()
        return loss.detach()

    sizes = dict(config=config.qformer, batch=batch, text=text, queries=config.num_query_tokens,
                 image_tokens=IMAGE_TOKENS, embed_dim=config.embed_dim)
    return model, ours, reference, sizes


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def stage1_step(quick: bool, device: str) -> Result:
    layers, batch, text = (2, 2, 32) if quick else (12, 8, 32)
    model, ours, reference, sizes = stage1_setup(layers, batch, text, device)
    ours_loss, ours_grads = ours(), gradients(model)
    ref_loss, ref_grads = reference(), gradients(model)
    cuda = torch.device(device).type == "cuda"
    tolerance = dict(atol=2e-2, rtol=2e-2) if cuda else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_loss, ref_loss, **tolerance)
    assert ours_grads.keys() == ref_grads.keys()
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], ref_grads[name], **tolerance, msg=f"gradient of {name}")
    diff = max([max_abs_diff(ours_loss, ref_loss)] + [max_abs_diff(ours_grads[k], ref_grads[k]) for k in ours_grads])
    result = Result("stage1_step", max_abs_diff=diff)
    time_alternately(ours, reference, rounds=3, device=device).into(result)
    shared, recomputed = flops.stage1_step(**sizes), flops.stage1_step(**sizes, shared_image_kv=False)
    result.limit = recomputed.total / shared.total
    result.mfu, extra = mfu_fields(shared.total, result.ours_s, device)
    result.extra.update(extra, speedup_over_limit=result.speedup / result.limit, layers=layers, batch=batch,
                        queries=QUERIES, text=text, image_tokens=IMAGE_TOKENS, dtype="bf16 autocast" if cuda else "fp32",
                        tolerance=tolerance, target="speedup >= 0.95 x limit")
    return result


def keep_ffn_activations() -> None:
    """Our FFN as LAVIS's BertIntermediate/BertOutput run it: act(fc1(x)) kept for the backward."""
    from qformer.models.qformer import FeedForward

    FeedForward.fc2_of_act = lambda self, inner: self.fc2(self.act(inner))


def step_memory(side: str, layers: int, batch: int, text: int, device: str) -> dict[str, float]:
    """One step of ``side`` ("ours", "reference" or "ref_kept_ffn"): its loss and the rise of peak memory over the
    memory held before it (model, inputs; gradients are allocated by the step, alike for both).

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU torch tracks no allocations, so this runs
    in a fresh process (:func:`stage1_memory`) and measures the peak resident set during the step
    over the resident set before it: large tensors are mmapped by malloc and returned at free, so
    the resident set follows what the tensors hold. Linux's peak (``VmHWM``) is reset just before
    the step (``/proc/self/clear_refs``), so the build's peak cannot hide the step's.
    """
    if side == "ref_kept_ffn":
        keep_ffn_activations()
    _, ours, reference, _ = stage1_setup(layers, batch, text, device)
    run = ours if side == "ours" else reference
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = run()
        synchronize(device)
        return {"loss": float(loss), "rise_bytes": torch.cuda.max_memory_allocated() - before}
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set (VmHWM) starts again from the current one
    loss = run()
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))  # kB
    return {"loss": float(loss), "rise_bytes": peak - before}


def stage1_memory(quick: bool, device: str) -> Result:
    layers, batch, text = (2, 4, 32) if quick else (12, 32, 32)
    measured = {}
    for side in ("ours", "reference", "ref_kept_ffn"):
        if torch.device(device).type == "cuda" and side != "ref_kept_ffn":
            measured[side] = step_memory(side, layers, batch, text, device)
            torch.cuda.empty_cache()
            continue
        command = [sys.executable, __file__, "--memory", side, "--layers", str(layers), "--batch", str(batch),
                   "--text", str(text), "--device", device]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{side}'s memory step failed:\n{done.stderr}")
        measured[side] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, ref, kept = measured["ours"], measured["reference"], measured["ref_kept_ffn"]
    tolerance = 1e-2 if torch.device(device).type == "cuda" else 1e-4
    for other in (ref, kept):
        assert abs(ours["loss"] - other["loss"]) <= tolerance * abs(other["loss"]), (ours["loss"], other["loss"])
    method = "cuda max_memory_allocated" if torch.device(device).type == "cuda" else "peak RSS (VmHWM, reset before the step) rise, fresh process"
    return Result("stage1_memory", max_abs_diff=abs(ours["loss"] - ref["loss"]),
                  peak_mem_ratio=ours["rise_bytes"] / ref["rise_bytes"],
                  extra={"ours_peak_gib": ours["rise_bytes"] / 2**30, "ref_peak_gib": ref["rise_bytes"] / 2**30,
                         "ref_kept_ffn_peak_gib": kept["rise_bytes"] / 2**30,
                         "peak_mem_ratio_vs_kept_ffn": ours["rise_bytes"] / kept["rise_bytes"],
                         "layers": layers, "batch": batch, "text": text, "image_tokens": IMAGE_TOKENS,
                         "method": method, "compared": "loss", "target": "peak_mem_ratio <= 0.8"})


BENCHMARKS: dict[str, Callable[[bool, str], Result]] = {
    "qformer_fwd_bwd": qformer_fwd_bwd,
    "stage1_step": stage1_step,
    "stage1_memory": stage1_memory,
}


def main() -> None:
    """One side's step memory, as a JSON line (the subprocess of :func:`stage1_memory`)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", choices=("ours", "reference", "ref_kept_ffn"), required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--text", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(json.dumps(step_memory(args.memory, args.layers, args.batch, args.text, args.device)))


if __name__ == "__main__":
    main()
