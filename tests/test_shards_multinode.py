"""Tar shards read on two machines: two ``torchrun`` nodes on loopback (gloo), each with
2 DataLoader workers (tests/shard_node.py), share 8 shards of 5 samples. In order, every sample
is read once an epoch by one node, and the next epoch deals the shards out differently.
Resampled, the draws are uniform over the shards and differ between nodes, workers and epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from test_train import caption_shards, free_port

HERE = Path(__file__).resolve().parent
SHARDS, PER_SHARD = 8, 5
SEED, BUFFER = 7, 4
DRAWS = 400  # samples each node draws per resampled epoch: 200 per worker, 40 whole shards
# chi-square critical value at significance 0.01 with SHARDS - 1 = 7 degrees of freedom
# (scipy.stats.chi2.ppf(0.99, 7) = 18.475)
CHI2_CRITICAL_7DF_1PCT = 18.475
ALL = {f"a picture number {n}" for n in range(SHARDS * PER_SHARD)}


def shard_of(text: str) -> int:
    """The shard that caption_shards wrote the sample with this caption to."""
    return int(text.rsplit(" ", 1)[1]) // PER_SHARD


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the two nodes read (tests/shard_node.py's JSON), by rank."""
    root = tmp_path_factory.mktemp("multinode")
    pattern = caption_shards(root / "shards", shards=SHARDS, per_shard=PER_SHARD)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    port = str(free_port())
    outs = [root / f"node{rank}.json" for rank in (0, 1)]
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", port,
             str(HERE / "shard_node.py"), pattern, str(outs[rank]), "--seed", str(SEED), "--buffer", str(BUFFER),
             "--draws", str(DRAWS)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    try:
        for rank, launch in enumerate(launches):
            output = launch.communicate(timeout=120)[0]
            assert launch.returncode == 0, f"node {rank}:\n{output[-3000:]}"
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
                launch.communicate()
    results = sorted((json.loads(out.read_text()) for out in outs), key=lambda result: result["rank"])
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    return results


@pytest.mark.parametrize("epoch", [0, 1])
def test_each_epoch_the_nodes_read_every_sample_once(nodes: list[dict], epoch: int) -> None:
    """Disjoint shares of whole shards, together every sample exactly once."""
    seen = [node["epochs"][epoch] for node in nodes]
    assert sorted(seen[0] + seen[1]) == sorted(ALL)  # none twice, none left out
    assert len(seen[0]) == len(seen[1]) == len(ALL) // 2  # 2 readers a node, 2 shards each
    assert {shard_of(t) for t in seen[0]}.isdisjoint(shard_of(t) for t in seen[1])


def test_the_next_epoch_deals_the_shards_out_differently(nodes: list[dict]) -> None:
    split = [[{shard_of(t) for t in node["epochs"][epoch]} for node in nodes] for epoch in (0, 1)]
    assert split[0] != split[1]


def test_resampled_draws_are_uniform_and_differ_between_nodes(nodes: list[dict]) -> None:
    """Each node stops after DRAWS samples. Every sample is drawn; as a draw takes a whole shard,
    the samples of a shard are drawn equally often, so the counts per sample, tested against
    uniform, are those of the 8 shards: a chi-square goodness-of-fit test with 7 degrees of
    freedom, at significance 0.01."""
    draws = [node["draws"][0] for node in nodes]
    assert [len(d) for d in draws] == [DRAWS, DRAWS]
    counts = Counter(draws[0] + draws[1])
    assert set(counts) == ALL
    by_shard: dict[int, set[int]] = {}
    for text, count in counts.items():
        by_shard.setdefault(shard_of(text), set()).add(count)
    assert all(len(shard_counts) == 1 for shard_counts in by_shard.values()), by_shard
    shard_draws = [by_shard[s].pop() for s in range(SHARDS)]
    assert sum(shard_draws) == 2 * DRAWS // PER_SHARD
    expected = sum(shard_draws) / SHARDS
    chi2 = sum((k - expected) ** 2 / expected for k in shard_draws)
    assert chi2 < CHI2_CRITICAL_7DF_1PCT, f"shard draws {shard_draws}: chi-square {chi2:.2f}"
    assert draws[0] != draws[1]
    for node in draws:  # a node's two workers take turns: they draw differently too
        assert any(a != b for a, b in zip(node[::2], node[1::2]))
    assert [node["draws"][1] for node in nodes] != draws  # and each epoch anew
