"""One node of tests/test_shards_multinode.py, started by ``python -m torch.distributed.run``:
joins the gloo group, reads its rank's share of tar shards through a DataLoader of 2 workers
for epochs 0 and 1, in order (each sample once an epoch) and resampled (``--draws`` samples an
epoch), and writes the captions it saw to ``OUT`` as JSON:
``{"rank", "world_size", "epochs": [[caption, ...] per epoch], "draws": [[caption, ...] per epoch]}``.

    python -m torch.distributed.run --nnodes 2 --nproc_per_node 1 --node_rank R \\
        --master_addr 127.0.0.1 --master_port P tests/shard_node.py PATTERN OUT --seed S --buffer B --draws N
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader

from qformer.data.shards import TarShardDataset, expand_shards

WORKERS = 2
EPOCHS = (0, 1)


def caption(sample: dict) -> str:
    """The DataLoader's collate (one sample at a time, in the worker): the sample's caption,
    which names it (the generated captions are numbered)."""
    return sample["text"]


def read(dataset: TarShardDataset, epoch: int, limit: int | None = None) -> list[str]:
    """The captions of ``dataset``'s ``epoch`` as this rank's DataLoader gives them, the first
    ``limit`` where set (a resampled reader never ends)."""
    dataset.epoch = epoch
    loader = DataLoader(dataset, batch_size=None, num_workers=WORKERS, collate_fn=caption)
    return list(itertools.islice(loader, limit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pattern", help="the shards (data.path syntax)")
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--seed", type=int, required=True, help="shuffle_seed")
    parser.add_argument("--buffer", type=int, required=True, help="shuffle_buffer of the in-order reading")
    parser.add_argument("--draws", type=int, required=True, help="samples this node draws per resampled epoch")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shards = expand_shards(args.pattern)
    ordered = TarShardDataset(shards, rank=rank, world_size=world_size, shuffle_seed=args.seed,
                              shuffle_buffer=args.buffer)
    resampled = TarShardDataset(shards, rank=rank, world_size=world_size, shuffle_seed=args.seed, resampled=True)
    result = {"rank": rank, "world_size": world_size, "epochs": [read(ordered, epoch) for epoch in EPOCHS],
              "draws": [read(resampled, epoch, args.draws) for epoch in EPOCHS]}
    args.out.write_text(json.dumps(result))
    dist.barrier()  # neither node leaves (and takes the store down) before the other is done
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
