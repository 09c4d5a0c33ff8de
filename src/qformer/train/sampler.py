"""Batches that resume exactly and make N processes see what one process would."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """A seeded shuffle per epoch, cut into global batches of ``batch_size * world_size``;
    rank r takes slice r of every global batch, so the global batch at each step is the batch
    one process with ``batch_size * world_size`` would see. Yields ``(epoch, index)`` pairs so
    that per-sample augmentation can be seeded from them. ``set_position`` resumes mid-epoch."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        self.global_batch = batch_size * world_size
        if size < self.global_batch:
            raise ValueError(f"{size} samples cannot fill one global batch of {self.global_batch}")
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.size // self.global_batch - self.start_batch

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for batch in range(self.start_batch, self.size // self.global_batch):
            start = batch * self.global_batch + self.rank * self.batch_size
            yield [(self.epoch, index) for index in order[start : start + self.batch_size]]
