"""Batches that resume exactly and make N processes see what one process would."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler


class SetMixture:
    """Several data sets, concatenated in the given order, mixed as InstructBLIP balances its
    training sets (Section 2.4, "Balancing Training Datasets"): each sample is drawn from set d
    with probability ``p_d = w_d * sqrt(S_d) / sum_i w_i * sqrt(S_i)``, S_d its size and w_d a
    manual multiplier (the paper lowers A-OKVQA's weight, multiple-choice answers, and raises
    OKVQA's, open-ended ones; it gives no numbers: 1 keeps the square-root rule). Uniform
    mixing would overfit the small sets and underfit the large ones.

    An epoch is ``sum(S_d)`` draws: which set each comes from (one vectorised multinomial draw),
    and within a set a seeded permutation, renewed each time the set is used up, so that no
    sample of a set repeats before all of it has been drawn."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None) -> None:
        weights = [1.0] * len(sizes) if weights is None else list(weights)
        if not sizes or len(weights) != len(sizes):
            raise ValueError(f"a mixture needs one weight per set: {len(sizes)} sets, {len(weights)} weights")
        if min(sizes) < 1 or min(weights) <= 0:
            raise ValueError(f"every set of a mixture needs samples and a weight above 0: sizes {list(sizes)}, "
                             f"weights {weights}")
        self.sizes, self.weights = list(sizes), weights
        self.starts = [sum(self.sizes[:d]) for d in range(len(self.sizes))]  # each set's first index
        shares = [w * math.sqrt(s) for s, w in zip(self.sizes, weights)]
        self.probabilities = [share / sum(shares) for share in shares]

    def __len__(self) -> int:
        return sum(self.sizes)

    def order(self, generator: torch.Generator) -> Tensor:
        """One epoch's ``len(self)`` indices into the concatenated sets."""
        picks = torch.multinomial(torch.tensor(self.probabilities, dtype=torch.float64), len(self), replacement=True,
                                  generator=generator)  # (N,) which set each draw comes from
        order = torch.empty(len(self), dtype=torch.long)
        for d, (size, start) in enumerate(zip(self.sizes, self.starts)):
            where = (picks == d).nonzero().squeeze(1)
            if len(where) == 0:
                continue
            passes = -(-len(where) // size)  # the set's permutations this epoch needs
            indices = torch.cat([torch.randperm(size, generator=generator) for _ in range(passes)])
            order[where] = indices[: len(where)] + start
        return order


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """A seeded shuffle per epoch (or, given a :class:`SetMixture`, its draws), cut into global
    batches of ``batch_size * world_size``; rank r takes slice r of every global batch, so the
    global batch at each step is the batch one process with ``batch_size * world_size`` would
    see. Yields ``(epoch, index)`` pairs so that per-sample augmentation can be seeded from them.
    ``set_position`` resumes mid-epoch."""

    def __init__(
        self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
        mixture: SetMixture | None = None,
    ) -> None:
        self.size, self.batch_size, self.rank, self.world_size, self.seed = size, batch_size, rank, world_size, seed
        if mixture is not None and len(mixture) != size:
            raise ValueError(f"the mixture covers {len(mixture)} samples, the data set {size}")
        self.mixture = mixture
        self.global_batch = batch_size * world_size
        if size < self.global_batch:
            raise ValueError(f"{size} samples cannot fill one global batch of {self.global_batch}")
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.size // self.global_batch - self.start_batch

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_order(self, epoch: int) -> list[int]:
        """Every index of ``epoch``, in the order the global batches take them."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.mixture is not None:
            return self.mixture.order(generator).tolist()
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.epoch_order(self.epoch)
        for batch in range(self.start_batch, self.size // self.global_batch):
            start = batch * self.global_batch + self.rank * self.batch_size
            yield [(self.epoch, index) for index in order[start : start + self.batch_size]]
