"""The trainer's endless batches, from a resumable position: (epoch, batches consumed in it).

Map-style data (scenes, caption, instruction and VQA files) goes through
:class:`~qformer.train.sampler.GlobalBatchSampler`. Tar shards stream: each rank reads its
share of the shards with ``data.num_workers`` DataLoader workers (at least one reader), every
reader batches its own samples, and an epoch ends for every rank when the first reader
anywhere runs out, so that all ranks agree on the position and no sample is read twice in an
epoch (the other readers' last samples wait for the next epoch's shard order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qformer.train.build import Job, TrainShards
from qformer.train.config import TrainConfig
from qformer.train.distributed import Runtime
from qformer.train.sampler import GlobalBatchSampler
from qformer.train.signals import ignore_stop_signals


class _Position:
    """A resumable position (epoch, batches consumed in it) and the DataLoader iterator."""

    epoch: int
    batch_in_epoch: int
    _iterator: Iterator | None

    def seek(self, epoch: int, batch_in_epoch: int) -> None:
        self.epoch, self.batch_in_epoch, self._iterator = epoch, batch_in_epoch, None

    def close(self) -> None:
        """End the DataLoader's workers now: they ignore the stop signals and are never
        exhausted, so they go when their iterator does."""
        self._iterator = None


class Batches(_Position):
    """Endless batches of map-style data over epochs, from a resumable position."""

    def __init__(self, job: Job, config: TrainConfig, runtime: Runtime) -> None:
        self.sampler = GlobalBatchSampler(
            len(job.dataset), config.data.batch_size, runtime.rank, runtime.world_size, config.seed
        )
        self.loader = DataLoader(
            job.dataset,
            batch_sampler=self.sampler,
            collate_fn=job.collate,
            num_workers=config.data.num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
            worker_init_fn=ignore_stop_signals,
        )
        self.per_epoch = len(job.dataset) // self.sampler.global_batch
        self.epoch, self.batch_in_epoch = 0, 0
        self._iterator: Iterator | None = None

    def __next__(self) -> dict:
        if self.batch_in_epoch >= self.per_epoch:
            self.epoch, self.batch_in_epoch, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            self._iterator = iter(self.loader)
        self.batch_in_epoch += 1
        return next(self._iterator)


class ShardStream(IterableDataset):
    """One rank's batches of an epoch of shards. Each reader (DataLoader worker) collates full
    batches of its own samples and ends with None. The DataLoader takes batches from its
    workers in turn, so batch ``k`` of the epoch is reader ``k % readers``'s; a stream that
    starts at batch ``start`` gives worker ``w`` the role of reader ``(w + start) % readers``,
    which passes over its samples of the batches before ``start`` undecoded: the same batches
    as the epoch read from its beginning."""

    def __init__(self, shards: TrainShards, collate: Callable[[list], dict], batch_size: int, readers: int) -> None:
        self.shards, self.collate, self.batch_size, self.readers = shards, collate, batch_size, readers
        self.start = 0

    def __iter__(self) -> Iterator[dict | None]:
        info = get_worker_info()
        reader = ((0 if info is None else info.id) + self.start) % self.readers
        done = len(range(reader, self.start, self.readers))  # this reader's batches before start
        batch: list = []
        for sample in self.shards.samples(reader, self.readers, skip=done * self.batch_size):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        yield None  # this reader is out of samples: the epoch ends here


def _as_is(batch: dict | None) -> dict | None:
    """The DataLoader's collate when the dataset yields whole batches."""
    return batch


class ShardBatches(_Position):
    """Endless batches of tar shards over epochs, from a resumable position: ``seek(epoch, b)``
    starts epoch ``epoch`` (its shard order) at its batch ``b``, every rank at the same place,
    passing over the first ``b`` batches without decoding them; with the same shards, world
    size and ``data.num_workers``, a resumed run sees exactly the batches of one never stopped."""

    def __init__(self, job: Job, config: TrainConfig, runtime: Runtime) -> None:
        shards: TrainShards = job.dataset
        readers = max(1, config.data.num_workers)
        count = len(shards.reader.shards)
        if count < runtime.world_size * readers:
            raise ValueError(
                f"{count} tar shards for {runtime.world_size} ranks x {readers} readers (data.num_workers, at least 1): "
                "each reader needs a shard of its own; use more shards or fewer workers"
            )
        self.shards, self.runtime, self.batch_size = shards, runtime, config.data.batch_size
        self.stream = ShardStream(shards, job.collate, config.data.batch_size, readers)
        self.loader = DataLoader(
            self.stream,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=config.data.num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
            worker_init_fn=ignore_stop_signals,
        )
        self.epoch, self.batch_in_epoch = 0, 0
        self._iterator: Iterator | None = None

    def _anyone_done(self, done: bool) -> bool:
        """Whether some rank's reader ran out (every rank asks at every batch)."""
        if self.runtime.world_size == 1:
            return done
        flag = torch.tensor([int(done)], device=self.runtime.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __next__(self) -> dict:
        while True:
            if self._iterator is None:
                self.shards.set_epoch(self.epoch)
                self.stream.start = self.batch_in_epoch
                self._iterator = iter(self.loader)
            batch = next(self._iterator)
            if not self._anyone_done(batch is None):
                self.batch_in_epoch += 1
                return batch
            if self.batch_in_epoch == 0:
                raise ValueError(
                    f"epoch {self.epoch} gave no batch: some reader's shards hold fewer than data.batch_size = "
                    f"{self.batch_size} samples; use more samples per shard or fewer data.num_workers"
                )
            self.epoch, self.batch_in_epoch, self._iterator = self.epoch + 1, 0, None


def data_batches(job: Job, config: TrainConfig, runtime: Runtime) -> Batches | ShardBatches:
    """The batches that suit the job's data."""
    if isinstance(job.dataset, TrainShards):
        return ShardBatches(job, config, runtime)
    return Batches(job, config, runtime)
