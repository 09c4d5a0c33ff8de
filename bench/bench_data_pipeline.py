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

``data_shards``: the same JPEGs in tar shards of 16, through the trainer's shard pipeline
(``TrainShards`` from the recipe's reader: data.shuffle_buffer, draft decoding, and the
DataLoader ``ShardBatches`` builds: 2 workers, each collating its own batches with the
trainer's collate) against webdataset's own pipeline on the same shards: ``WebDataset(urls,
shardshuffle=..., nodesplitter=split_by_node).shuffle(B).decode("pil")``, the same transform
with the same seeds (``train_transform`` seeded by the sample's place), batched with the same
collate by the same 2 workers. One timed call is one epoch, every sample once.
"""

from __future__ import annotations

import random
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
from qformer.data.shards import shard_name, write_tar_shard
from qformer.data.transforms import clean_caption, train_transform
from qformer.train.config import TrainConfig
from qformer.train.data import TrainImages
from qformer.train.job import Job

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


SHARD_CACHE = CACHE.parent / "jpeg-shards-v1"
SHARD_IMAGES = {True: 64, False: 256}  # quick, full: whole batches for each of the 2 readers
PER_SHARD = 16


def jpeg_shards(count: int) -> str:
    """The first ``count`` of the benchmark's JPEGs in tar shards of ``PER_SHARD`` (caption
    "a photo"), written once to ``SHARD_CACHE``; their brace pattern."""
    paths = jpeg_files(count)
    SHARD_CACHE.mkdir(parents=True, exist_ok=True)
    shards = range(count // PER_SHARD)
    for s in shards:
        shard = SHARD_CACHE / f"{s:05d}.tar"
        if not shard.exists():
            part = paths[s * PER_SHARD : (s + 1) * PER_SHARD]
            write_tar_shard(shard.with_suffix(".part"),
                            [{"__key__": path.stem, "jpg": path.read_bytes(), "txt": "a photo"} for path in part])
            shard.with_suffix(".part").rename(shard)
    return f"{SHARD_CACHE}/{{00000..{shards[-1]:05d}}}.tar"


def shard_job(pattern: str) -> tuple[Job, TrainConfig]:
    """The trainer's job and recipe for the tiny recipe on ``pattern``'s shards at 224 px,
    2 workers, batches of 16 (the recipe's seed, data.shuffle_buffer and data.prefetch_factor)."""
    from qformer.train.build import build_job
    from qformer.train.config import load_train_config
    from qformer.train.distributed import Runtime

    config = load_train_config(TINY_RECIPE, [
        "--data.source", "shards", "--data.path", pattern, "--data.image_size", str(SIZE),
        "--data.num_workers", str(WORKERS), "--data.batch_size", str(BATCH)])
    return build_job(config, Runtime(0, 1, 0, torch.device("cpu"))), config


class WebDatasetReference:
    """webdataset's pipeline on the shards: shards split by node and worker and shuffled,
    ``shuffle(buffer)`` (yielding once full, as ours), ``decode("pil")``, then BLIP-2's train
    transform seeded as :class:`~qformer.train.data.TrainShards` seeds it (the seed, epoch 0
    and the sample's place), so the crops and flips are ours."""

    def __init__(self, pattern: str, image: ImageConfig, seed: int, buffer: int) -> None:
        self.pattern, self.image, self.seed, self.buffer = pattern, image, seed, buffer

    def placed(self, raw: dict) -> tuple[str, dict]:
        """(place, sample) of a decoded webdataset sample, its image augmented."""
        place = f"{shard_name(raw['__url__'])}:{raw['__key__']}"
        rng = random.Random(f"{self.seed}:0:{place}")
        sample = {"image": train_transform(raw["jpg"], self.image, rng), "text": clean_caption(raw["txt"]),
                  "image_id": int(raw["__key__"])}
        return place, sample

    def pipeline(self):
        """(place, sample) pairs, as one process (or DataLoader worker) reads them."""
        import webdataset as wds

        data = wds.WebDataset(self.pattern, shardshuffle=PER_SHARD, nodesplitter=wds.split_by_node, seed=self.seed)
        return data.shuffle(self.buffer, initial=self.buffer).decode("pil").map(self.placed)

    def loader(self, collate: Callable[[list], dict], prefetch_factor: int) -> DataLoader:
        """Batches of ``BATCH`` collated in ``WORKERS`` workers, the DataLoader as ours."""
        batches = self.pipeline().map(_sample_of).batched(BATCH, collation_fn=collate, partial=False)
        return DataLoader(batches, batch_size=None, num_workers=WORKERS, prefetch_factor=prefetch_factor,
                          persistent_workers=False)


def _sample_of(placed: tuple[str, dict]) -> dict:
    return placed[1]


def _epoch_images(loader: DataLoader) -> int:
    """Read one epoch of ``loader``'s batches (None: a reader's end); the images in them."""
    return sum(len(batch["texts"]) for batch in loader if batch is not None)


def bench_data_shards(quick: bool, device: str) -> Result:
    del device  # the pipeline runs on the CPU
    from qformer.data.shards import ShardEnd
    from qformer.train.batches import ShardBatches
    from qformer.train.distributed import Runtime

    count = SHARD_IMAGES[quick]
    job, config = shard_job(jpeg_shards(count))
    image = ImageConfig(size=SIZE)
    reference = WebDatasetReference(config.data.path, image, config.seed, config.data.shuffle_buffer)
    job.dataset.set_epoch(0)
    ours_samples = {place: sample for place, sample in job.dataset.samples(0, 1) if not isinstance(sample, ShardEnd)}
    ref_samples = dict(reference.pipeline())
    assert sorted(ours_samples) == sorted(ref_samples) and len(ours_samples) == count, "the two read other samples"
    assert all(isinstance(sample, dict) for sample in ours_samples.values()), "ours skipped a sample"
    difference = torch.stack([(ours_samples[p]["image"] - ref_samples[p]["image"]).abs() for p in ours_samples])
    mean_abs_diff = float(difference.mean())
    assert mean_abs_diff < 0.05, f"draft decoding moved the pixels by {mean_abs_diff} on average"
    ours_loader = ShardBatches(job, config, Runtime(0, 1, 0, torch.device("cpu"))).loader  # the trainer's
    ref_loader = reference.loader(job.collate, config.data.prefetch_factor)
    assert _epoch_images(ours_loader) == _epoch_images(ref_loader) == count, "an epoch left samples out"
    timing = time_alternately(lambda: _epoch_images(ours_loader), lambda: _epoch_images(ref_loader),
                              rounds=3 if quick else 5)
    result = timing.into(Result("data_shards", max_abs_diff=float(difference.max())))
    consumption = tiny_step_images_per_second(rounds=10 if quick else 30)
    ours_rate = count / result.ours_s
    result.extra.update(
        images=count, shards=count // PER_SHARD, image_size=SIZE, workers=WORKERS, batch=BATCH,
        shuffle_buffer=config.data.shuffle_buffer, prefetch_factor=config.data.prefetch_factor,
        mean_abs_diff=mean_abs_diff, ours_images_per_s=ours_rate, ref_images_per_s=count / result.ref_s,
        tiny_step_images_per_s=consumption["tiny_step_images_per_s"],
        keeps_up=ours_rate >= consumption["tiny_step_images_per_s"],
        target="images/s >= the tiny stage-1 step's; the speedup over webdataset reported",
    )
    return result


BENCHMARKS = {"data": bench_data, "data_shards": bench_data_shards}
