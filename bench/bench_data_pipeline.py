"""The training data pipeline: images per second of decode + RandomResizedCrop + flip +
normalise on JPEGs of web sizes (500-1500 px), 2 DataLoader workers, 224 px.

Ours: the trainer's pieces (``CaptionDataset`` under ``TrainImages``: each JPEG decodes in
draft mode at the smallest scale that keeps its random crop at least 224 px each way).
Reference: ``Image.open(path).convert("RGB")`` at full size, then the same ``TrainImages``
without drafting (same seeds, same crop boxes as fractions of the image, same flips). Both sides
run the same DataLoader (2 persistent workers, batches of 16 stacked to a tensor); one timed call
is one pass over the images. Their tensors differ only by the decoding scale (max and mean
absolute difference of the normalised pixels). The target's second half: our images/s against
what the stage-1 step of ``configs/tiny.yaml`` consumes on this machine (forward, backward,
AdamW on one batch of its own), and our images/s at that recipe's image size (32 px).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from harness import Result, time_alternately
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from qformer.config import ImageConfig
from qformer.data.datasets import CaptionDataset, CaptionRecord
from qformer.train.build import TrainImages

CACHE = Path.home() / ".cache" / "qformer-bench" / "jpegs-v1"
IMAGES = {True: 48, False: 240}  # quick, full
SIZE = 224
WORKERS = 2
BATCH = 16
TINY_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def web_jpeg(rng: np.random.Generator) -> Image.Image:
    """A photo-like image of a web size: long side 500-1500 px, aspect 1 to 16/9 either way
    (short side at least 500), smooth colour fields at two scales plus sensor-like noise."""
    long = int(rng.integers(500, 1501))
    short = max(500, round(long / rng.uniform(1, 16 / 9)))
    width, height = (long, short) if rng.random() < 0.5 else (short, long)
    layers = []
    for cells, weight in ((4, 0.7), (40, 0.3)):
        field = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        layers.append(weight * np.asarray(field.resize((width, height), Image.Resampling.BICUBIC), np.float32))
    pixels = sum(layers) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_files(count: int) -> list[Path]:
    """The first ``count`` of the benchmark's JPEGs (quality 90), written once to ``CACHE``."""
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = [CACHE / f"{i:04d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            partial = path.with_suffix(".part")
            web_jpeg(np.random.default_rng(i)).save(partial, format="JPEG", quality=90)
            partial.rename(path)
    return paths


class PlainImages(Dataset):
    """The reference's decoding: ``Image.open(path).convert("RGB")``, samples as CaptionDataset's."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        with Image.open(self.paths[index]) as image:
            return {"image": image.convert("RGB"), "text": "a photo", "image_id": index}


def ours_dataset(paths: list[Path], image: ImageConfig) -> TrainImages:
    records = [CaptionRecord(path.name, "a photo", i) for i, path in enumerate(paths)]
    return TrainImages(CaptionDataset(records, paths[0].parent), image, seed=0)


def stacked(samples: list[dict]) -> torch.Tensor:
    return torch.stack([sample["image"] for sample in samples])  # (B, 3, S, S)


def loader(data: Dataset) -> DataLoader:
    keys = [(0, i) for i in range(len(data))]  # (epoch, index), as the trainer's sampler gives
    return DataLoader(data, batch_size=BATCH, sampler=keys, num_workers=WORKERS, collate_fn=stacked,
                      persistent_workers=True)


def tiny_step_images_per_second(rounds: int) -> dict:
    """Images per second that the stage-1 step (forward, backward, AdamW) of the tiny recipe
    consumes here, on one batch of its own data, the median of ``rounds`` steps."""
    from qformer.train.build import build_job
    from qformer.train.config import load_train_config
    from qformer.train.distributed import Runtime
    from qformer.train.optim import build_optimizer

    config = load_train_config(TINY_RECIPE)
    torch.manual_seed(config.seed)
    job = build_job(config, Runtime(0, 1, 0, torch.device("cpu")))
    batch = job.collate([job.dataset[(0, i)] for i in range(config.data.batch_size)])
    optimizer = build_optimizer(job.model, config.optim)
    job.model.train()
    times = []
    for step in range(rounds + 1):  # the first is the warm-up
        start = time.perf_counter()
        job.losses(job.objective, batch, torch.Generator().manual_seed(step))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times[1:]))
    return {"tiny_step_images_per_s": config.data.batch_size / step_s, "tiny_image_size": config.data.image_size,
            "tiny_batch_size": config.data.batch_size}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_data(quick: bool, device: str) -> Result:
    del device  # the pipeline runs on the CPU
    paths = jpeg_files(IMAGES[quick])
    image = ImageConfig(size=SIZE)
    ours_data, ref_data = ours_dataset(paths, image), TrainImages(PlainImages(paths), image, seed=0, draft=False)
    ours_pixels = torch.stack([ours_data[(0, i)]["image"] for i in range(len(paths))])
    ref_pixels = torch.stack([ref_data[(0, i)]["image"] for i in range(len(paths))])
    difference = (ours_pixels - ref_pixels).abs()
    mean_abs_diff = float(difference.mean())
    assert mean_abs_diff < 0.05, f"draft decoding moved the pixels by {mean_abs_diff} on average"
    ours_loader, ref_loader = loader(ours_data), loader(ref_data)
    for ours_batch, ref_batch in zip(ours_loader, ref_loader):  # the loaders give what the datasets give
        assert ours_batch.shape == ref_batch.shape == (min(BATCH, len(paths)), 3, SIZE, SIZE)
        break
    timing = time_alternately(lambda: list(ours_loader), lambda: list(ref_loader), rounds=3 if quick else 5)
    result = timing.into(Result("data", max_abs_diff=float(difference.max())))
    consumption = tiny_step_images_per_second(rounds=10 if quick else 30)
    tiny = ImageConfig(size=consumption["tiny_image_size"])  # what the tiny recipe's step takes in
    tiny_loader = loader(ours_dataset(paths, tiny))
    list(tiny_loader)  # warm-up: the workers start
    tiny_s = float(np.median([_seconds(lambda: list(tiny_loader)) for _ in range(3)]))
    megapixels = [Image.open(path).size for path in paths]
    result.extra.update(
        images=len(paths), image_size=SIZE, workers=WORKERS, batch=BATCH, mean_abs_diff=mean_abs_diff,
        mean_megapixels=float(np.mean([w * h for w, h in megapixels]) / 1e6),
        ours_images_per_s=len(paths) / result.ours_s, ref_images_per_s=len(paths) / result.ref_s, **consumption,
        ours_images_per_s_at_tiny_size=len(paths) / tiny_s,
        target="speedup >= 2 and images/s >= the tiny stage-1 step's",
    )
    return result


BENCHMARKS = {"data": bench_data}
