"""Image-text retrieval as BLIP-2 evaluates it (Table 5): COCO's 5K Karpathy test and Flickr30K's
1K test, every image against every caption, ITC similarity re-ranked by ITM over the ``k = 128``
best candidates each way, recall@1/5/10 both ways. Stage-1 models.

Files under ``--data``, as LAVIS's annotations have them: ``coco_karpathy_test.json`` or
``flickr30k_test.json`` (``[{"image": "<path under --data>", "caption": [five captions]}]``)
and the images at those paths. Captions are cleaned as LAVIS does (``pre_caption``: lowercase,
punctuation out, at most 50 words) and tokenized to 32 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qformer.checkpoint import atomic_write
from qformer.evaluate.benchmarks import karpathy_test
from qformer.retrieval import RERANK_DEPTH, retrieval_recall, retrieval_scores, tokenize

RETRIEVAL_TASKS = {"coco_retrieval": "coco_karpathy_test.json", "flickr_retrieval": "flickr30k_test.json"}


def read_retrieval_test(root: Path, task: str) -> tuple[list[Path], list[str], list[int]]:
    """The images, the captions and each caption's image index."""
    images = karpathy_test(root, RETRIEVAL_TASKS[task])
    captions = [caption for image in images for caption in image.answers]
    owner = [index for index, image in enumerate(images) for _ in image.answers]
    return [image.image for image in images], captions, owner


@torch.no_grad()
def evaluate_retrieval_task(model: Any, task: str, data: str | Path, out: str | Path, k: int = RERANK_DEPTH,
                            batch_size: int = 32, limit: int | None = None,
                            fingerprint: str | None = None) -> dict[str, Any]:
    """Recall@1/5/10 both ways (``txt_r``: image -> text, ``img_r``: text -> image), in percent;
    written to ``OUT/results.json`` with the settings."""
    from tqdm import tqdm

    from qformer.data.transforms import clean_caption, eval_image

    images, captions, owner = read_retrieval_test(Path(data), task)
    if limit is not None:
        images = images[:limit]
        kept = [i for i, image in enumerate(owner) if image < limit]
        captions, owner = [captions[i] for i in kept], [owner[i] for i in kept]
    device = model.ln_vision.weight.device
    embeds = []
    for start in tqdm(range(0, len(images), batch_size), desc=f"{task} images", unit="batch"):
        pixels = torch.stack([eval_image(path, model.config.image) for path in images[start : start + batch_size]])
        embeds.append(model.image_embeds(pixels.to(device)))  # (B, S, W)
    input_ids, attention_mask = tokenize(model, [clean_caption(c) for c in captions])
    i2t, t2i = retrieval_scores(model, torch.cat(embeds), input_ids, attention_mask, k=k, chunk=batch_size)
    recall = retrieval_recall(i2t, t2i, torch.tensor(owner), k=k)
    settings = {"task": task, "data": str(Path(data).resolve()), "images": len(images), "captions": len(captions),
                "k": k, "caption_cleaning": "LAVIS's pre_caption", "max_text_tokens": 32,
                "model_fingerprint": fingerprint}
    results = {**{key: round(value, 2) for key, value in recall.items()}, "count": len(images), "settings": settings}
    out = Path(out)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))
    return results
