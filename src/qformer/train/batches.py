"""The trainer's endless batches, from a resumable position: (epoch, batches consumed in it).

Map-style data (scenes, caption, instruction and VQA files) goes through
:class:`~qformer.train.sampler.GlobalBatchSampler` (several instruction sets: drawn as the
job's :class:`~qformer.train.sampler.SetMixture` says). Tar shards stream: each rank reads its
share of the shards with ``data.num_workers`` DataLoader workers (at least one reader), every
reader batches its own samples, and an epoch ends for every rank when the first reader
anywhere runs out, so that all ranks agree on the position and no sample is read twice in an
epoch (the other readers' last samples wait for the next epoch's shard order).

A batch with no readable sample (on any rank) is passed over by every rank, so that all ranks
do the same passes and agree on the position; its skipped samples are counted with the next
batch's. Once :data:`UNREADABLE_CHECK_AFTER` samples are read (all ranks together), a run
whose share of unreadable samples is over ``data.max_unreadable`` stops.
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

UNREADABLE_CHECK_AFTER = 100  # samples read before the share of unreadable ones can stop a run
NAMED = 3  # unreadable samples named when it does


class _Unreadable:
    """The unreadable samples of the batches drawn (summed over the ranks when several run):
    batches with no readable sample are passed over (their counts and names carried into the
    next batch taken), and a run whose share of unreadable samples is over ``limit`` stops."""

    def __init__(self, limit: float, runtime: Runtime) -> None:
        self.limit, self.runtime = limit, runtime
        self.seen, self.skipped = 0, 0
        self.passed_over = 0  # batches in a row
        self.names: list[str] = []  # this rank's first few
        self.carried = {"skipped": 0, "skipped_samples": []}  # from the batches passed over

    def agree(self, batch: dict | None, collective: bool) -> tuple[bool, bool]:
        """(some rank is out of data, some rank's batch has no readable sample), every rank
        agreeing when ``collective``; counts the batch unless some rank is out of data."""
        if batch is None:
            counts = [1, 0, 0, 0]
        else:
            counts = [0, int(batch.get("empty", False)), batch["skipped"], batch["samples"]]
        if collective:
            flags = torch.tensor(counts, device=self.runtime.device)
            dist.all_reduce(flags)
            counts = flags.tolist()
        done, empty, skipped, seen = counts
        if done:
            return True, False
        self.seen, self.skipped = self.seen + seen, self.skipped + skipped
        self.names += batch["skipped_samples"][: NAMED - len(self.names)]
        if self.seen >= UNREADABLE_CHECK_AFTER and self.skipped > self.limit * self.seen:
            raise ValueError(
                f"{self.skipped} of the {self.seen} samples read so far were unreadable "
                f"({self.skipped / self.seen:.0%}, over data.max_unreadable {self.limit}){self._first()}; "
                "fix the data set or raise data.max_unreadable"
            )
        if empty:
            self.passed_over += 1
            self.carried["skipped"] += batch["skipped"]
            self.carried["skipped_samples"] += batch["skipped_samples"]
        return False, bool(empty)

    def check_epoch(self, batches: int) -> None:
        """Stop once the last ``batches`` (an epoch's) were all passed over: nothing to train on."""
        if batches and self.passed_over >= batches:
            raise ValueError(f"no batch of a whole epoch held a readable sample ({self.skipped} of {self.seen} "
                             f"samples unreadable){self._first()}; fix the data set")

    def _first(self) -> str:
        return f"; first: {'; '.join(self.names)}" if self.names else ""

    def taken(self, batch: dict) -> dict:
        """``batch`` as the trainer takes it: the counts of the batches passed over added."""
        batch.pop("empty", None)
        batch.pop("samples")
        batch["skipped"] += self.carried["skipped"]
        batch["skipped_samples"] = self.carried["skipped_samples"] + batch["skipped_samples"]
        self.carried, self.passed_over = {"skipped": 0, "skipped_samples": []}, 0
        return batch


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
            len(job.dataset), config.data.batch_size, runtime.rank, runtime.world_size, config.seed, job.mixture
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
        self.unreadable = _Unreadable(config.data.max_unreadable, runtime)
        self.collective = runtime.world_size > 1

    def __next__(self) -> dict:
        while True:
            self.unreadable.check_epoch(self.per_epoch)
            if self.batch_in_epoch >= self.per_epoch:
                self.epoch, self.batch_in_epoch, self._iterator = self.epoch + 1, 0, None
            if self._iterator is None:
                self.sampler.set_position(self.epoch, self.batch_in_epoch)
                self._iterator = iter(self.loader)
            self.batch_in_epoch += 1
            batch = next(self._iterator)
            _, empty = self.unreadable.agree(batch, self.collective)
            if not empty:
                return self.unreadable.taken(batch)


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
        self.unreadable = _Unreadable(config.data.max_unreadable, runtime)

    def __next__(self) -> dict:
        while True:
            if self._iterator is None:
                self.shards.set_epoch(self.epoch)
                self.stream.start = self.batch_in_epoch
                self._iterator = iter(self.loader)
            batch = next(self._iterator)
            # every rank asks at every batch whether some rank's reader ran out
            done, empty = self.unreadable.agree(batch, collective=self.runtime.world_size > 1)
            if not done:
                self.batch_in_epoch += 1
                if not empty:
                    return self.unreadable.taken(batch)
                continue
            self.unreadable.check_epoch(self.batch_in_epoch)
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
