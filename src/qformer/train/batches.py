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

from qformer.data.shards import ShardEnd
from qformer.train.config import TrainConfig
from qformer.train.data import Consumed, TrainShards
from qformer.train.distributed import Runtime
from qformer.train.job import Job
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

    def seek(self, epoch: int, batch_in_epoch: int, data: dict | None = None) -> None:
        """Start at batch ``batch_in_epoch`` of epoch ``epoch``; ``data``: what :meth:`state` saved."""
        self.epoch, self.batch_in_epoch, self._iterator = epoch, batch_in_epoch, None

    def state(self) -> dict:
        """What a resume needs besides the position (every rank calls it together)."""
        return {}

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
    batches of its own samples, each with the places it took (``places``) and the sizes of the
    shards it finished reading (``shard_ends``), and ends with None. The DataLoader takes
    batches from its workers in turn, so batch ``k`` of the epoch is reader ``k % readers``'s;
    a stream that starts at batch ``start`` gives worker ``w`` the role of reader
    ``(w + start) % readers``, which passes over its samples of the batches before ``start``
    undecoded: the same batches as the epoch read from its beginning. With ``consumed`` (a
    resume with another number of readers) the readers leave out what it names instead.
    Resampled, each reader stops after ``quota`` batches."""

    def __init__(self, shards: TrainShards, collate: Callable[[list], dict], batch_size: int, readers: int,
                 quota: int | None) -> None:
        self.shards, self.collate, self.batch_size, self.readers, self.quota = shards, collate, batch_size, readers, quota
        self.start, self.consumed = 0, None

    def __iter__(self) -> Iterator[dict | None]:
        info = get_worker_info()
        reader = ((0 if info is None else info.id) + self.start) % self.readers
        done = len(range(reader, self.start, self.readers))  # this reader's batches before start
        batch, places, ends, made = [], [], {}, done
        samples = self.shards.samples(reader, self.readers, skip=done * self.batch_size, consumed=self.consumed)
        for place, sample in samples:
            if isinstance(sample, ShardEnd):
                ends[sample.name] = sample.places
                continue
            if self.quota is not None and made >= self.quota:
                break
            batch.append(sample)
            places.append(place)
            if len(batch) == self.batch_size:
                yield {**self.collate(batch), "places": places, "shard_ends": ends}
                batch, places, ends, made = [], [], {}, made + 1
        yield None  # this reader is out of samples: the epoch ends here


def _as_is(batch: dict | None) -> dict | None:
    """The DataLoader's collate when the dataset yields whole batches."""
    return batch


class _Taken:
    """The places an epoch's batches took on this rank, and the shards taken whole."""

    def __init__(self) -> None:
        self.places: dict[str, set[str]] = {}  # shard name -> its places taken
        self.sizes: dict[str, int] = {}  # shard name -> its places, once read whole
        self.done: set[str] = set()

    def add(self, batch: dict, record: bool = True) -> None:
        """Take ``batch``'s places and shard sizes off it, and note them where ``record``."""
        ends, places = batch.pop("shard_ends"), batch.pop("places")
        if not record:
            return
        self.sizes.update(ends)
        for place in places:
            self.places.setdefault(place.partition(":")[0], set()).add(place)
        for name in [n for n, taken in self.places.items() if len(taken) == self.sizes.get(n, -1)]:
            self.done.add(name)
            del self.places[name]

    def state(self) -> dict:
        return {"done": sorted(self.done), "places": sorted(p for taken in self.places.values() for p in taken)}


class ShardBatches(_Position):
    """Endless batches of tar shards over epochs, from a resumable position: ``seek(epoch, b,
    data)`` starts epoch ``epoch`` at its batch ``b``, every rank at the same place. With the
    shards, world size and ``data.num_workers`` of the run that saved it, the first ``b``
    batches are passed over undecoded and the resumed run sees exactly the batches of one never
    stopped. With another ``data.num_workers`` or world size, the epoch goes on without what
    ``data`` says it took (the shards read whole, the places of the others, over every rank): no
    sample is taken twice or left out of the epoch, in another order. Resampled, a resume draws anew."""

    def __init__(self, job: Job, config: TrainConfig, runtime: Runtime) -> None:
        shards: TrainShards = job.dataset
        readers = max(1, config.data.num_workers)
        count = len(shards.reader.shards)
        if count < runtime.world_size * readers and not config.data.resampled:
            raise ValueError(
                f"{count} tar shards for {runtime.world_size} ranks x {readers} readers (data.num_workers, at least 1): "
                "each reader needs a shard of its own; use more shards or fewer workers"
            )
        quota = None
        if config.data.resampled:
            quota = config.data.epoch_samples // (runtime.world_size * readers * config.data.batch_size)
            if quota < 1:
                raise ValueError(f"data.epoch_samples {config.data.epoch_samples} is less than a batch for each of the "
                                 f"{runtime.world_size * readers} readers")
        self.shards, self.runtime, self.batch_size, self.readers = shards, runtime, config.data.batch_size, readers
        self.stream = ShardStream(shards, job.collate, config.data.batch_size, readers, quota)
        workers = config.data.num_workers
        self.loader = DataLoader(
            self.stream,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            persistent_workers=False,  # each epoch's readers start with that epoch's shard order
            prefetch_factor=config.data.prefetch_factor if workers else None,
            pin_memory=runtime.device.type == "cuda",
            generator=torch.Generator().manual_seed(config.seed),  # keeps the global RNG untouched
            worker_init_fn=ignore_stop_signals,
        )
        self.epoch, self.batch_in_epoch = 0, 0
        self._iterator: Iterator | None = None
        self.taken = _Taken()
        self.unreadable = _Unreadable(config.data.max_unreadable, runtime)

    def seek(self, epoch: int, batch_in_epoch: int, data: dict | None = None) -> None:
        super().seek(epoch, batch_in_epoch)
        self.stream.consumed = None
        replay = not data or (data["exact"] and data["readers"] == self.readers
                              and data.get("world", self.runtime.world_size) == self.runtime.world_size)
        if not replay and not self.shards.reader.resampled:
            self.stream.consumed = Consumed(frozenset(data["done"]), frozenset(data["places"]))
        self.taken = _Taken()
        if self.stream.consumed is not None:  # what the earlier run took stays taken
            self.taken.done.update(data["done"])
            for place in data["places"]:
                self.taken.places.setdefault(place.partition(":")[0], set()).add(place)

    def state(self) -> dict:
        """What this epoch took so far over every rank (a collective), and the readers."""
        mine = self.taken.state()
        parts = [mine]
        if self.runtime.world_size > 1:
            parts = [None] * self.runtime.world_size
            dist.all_gather_object(parts, mine)
        return {"readers": self.readers, "world": self.runtime.world_size, "exact": self.stream.consumed is None,
                "done": sorted({n for p in parts for n in p["done"]}),
                "places": sorted({x for p in parts for x in p["places"]})}

    def __next__(self) -> dict:
        while True:
            if self._iterator is None:
                self.shards.set_epoch(self.epoch)
                self.stream.start = 0 if self.stream.consumed is not None else self.batch_in_epoch
                self._iterator = iter(self.loader)
            batch = next(self._iterator)
            if batch is not None:
                self.taken.add(batch, record=not self.shards.reader.resampled)
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
            self.stream.consumed, self.taken = None, _Taken()


def data_batches(job: Job, config: TrainConfig, runtime: Runtime) -> Batches | ShardBatches:
    """The batches that suit the job's data."""
    if isinstance(job.dataset, TrainShards):
        return ShardBatches(job, config, runtime)
    return Batches(job, config, runtime)
