"""Tar shards as img2dataset writes them (caption in the json, failed downloads in the parquet
manifest), several captions per image drawn per epoch, and a resume with another number of
readers that neither repeats nor leaves out a sample."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from qformer.config import ImageConfig
from qformer.data.datasets import Skipped
from qformer.data.shards import ShardEnd, TarShardDataset, expand_shards, shard_name, write_tar_shard
from qformer.train.batches import ShardBatches
from qformer.train.data import RefillSkipped, TrainShards
from qformer.train.distributed import Runtime
from test_train import caption_shards, tiny


def picture(n: int) -> Image.Image:
    return Image.new("RGB", (24, 20), (10 * n, 200 - 10 * n, 90))


def samples_of(dataset: TarShardDataset) -> list:
    return [sample for _, sample in dataset.keyed(dataset.shards) if not isinstance(sample, ShardEnd)]


def test_img2dataset_layout_caption_from_json_failed_downloads_left_out(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    keys = [f"00000{i:04d}" for i in range(6)]
    status = ["success", "success", "failed_to_download", "success", "failed_to_download", "success"]
    written = [{"__key__": key, "jpg": picture(i), "json": {"caption": f"photo {i}", "key": key}}
               for i, key in enumerate(keys) if status[i] == "success" or i == 4]  # a stub of a failure kept by mistake
    shard = write_tar_shard(tmp_path / "00000.tar", written)
    pq.write_table(pa.table({"key": keys, "status": status, "caption": [f"photo {i}" for i in range(6)]}),
                   tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 6, "successes": 4, "failed_to_download": 2}))
    read = samples_of(TarShardDataset([shard], caption_key="json:caption"))
    assert [s["text"] for s in read] == ["photo 0", "photo 1", "photo 3", "photo 5"]  # no Skipped: nothing lost
    without_json = samples_of(TarShardDataset([shard]))  # caption_key txt: there is none
    assert all(isinstance(s, Skipped) and "'txt'" in s.reason for s in without_json)
    with pytest.raises(ValueError, match="caption_key 'json:'"):
        TarShardDataset([shard], caption_key="json:")


def drawn(dataset: TarShardDataset, epoch: int) -> str:
    dataset.epoch = epoch
    return samples_of(dataset)[0]["text"]


def test_several_captions_one_drawn_per_epoch(tmp_path: Path) -> None:
    captions = ["a red square", "a square that is red", "red, square"]
    shard = write_tar_shard(tmp_path / "s.tar", [{"__key__": "k", "png": picture(1), "json": {"captions": captions}}])
    dataset = TarShardDataset([shard], caption_key="json:captions", shuffle_seed=3)
    per_epoch = [drawn(dataset, epoch) for epoch in range(60)]
    assert per_epoch == [drawn(dataset, epoch) for epoch in range(60)]  # seeded: the same epoch draws the same
    assert set(per_epoch) == set(captions) and all(per_epoch.count(text) >= 10 for text in captions)  # ~ a third each
    other_seed = TarShardDataset([shard], caption_key="json:captions", shuffle_seed=4)
    assert [drawn(other_seed, epoch) for epoch in range(8)] != per_epoch[:8]


def shard_batches(pattern: str, workers: int, run: Path) -> ShardBatches:
    config = tiny(run, "--data.source", "shards", "--data.path", pattern, "--data.num_workers", str(workers),
                  "--data.batch_size", "2", "--data.shuffle_buffer", "3")
    reader = TarShardDataset(expand_shards(pattern), shuffle_seed=config.seed, shuffle_buffer=3)
    job = SimpleNamespace(dataset=TrainShards(reader, ImageConfig(size=16), config.seed),
                          collate=RefillSkipped(lambda samples: {"texts": [s["text"] for s in samples]}))
    return ShardBatches(job, config, Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def epoch_texts(batches: ShardBatches) -> list[str]:
    """The rest of the current epoch's captions."""
    epoch, texts = batches.epoch, []
    while True:
        batch = next(batches)
        if batches.epoch != epoch:
            return texts + ["<next epoch>"] + batch["texts"]
        texts += batch["texts"]


def test_resume_with_other_readers_neither_repeats_nor_leaves_out(tmp_path: Path) -> None:
    pattern = caption_shards(tmp_path / "shards", shards=6, per_shard=5)
    everything = sorted(f"a picture number {n}" for n in range(30))
    first = shard_batches(pattern, 2, tmp_path / "a")
    taken = [text for _ in range(5) for text in next(first)["texts"]]
    position, state = (first.epoch, first.batch_in_epoch), first.state()
    rest_of_first = epoch_texts(first)
    first.close()
    assert state["readers"] == 2 and state["exact"] and state["done"]  # some shard already taken whole

    same = shard_batches(pattern, 2, tmp_path / "b")  # the same readers: exactly the batches that followed
    same.seek(*position, state)
    assert epoch_texts(same) == rest_of_first
    same.close()

    fewer = shard_batches(pattern, 0, tmp_path / "c")  # one reader now: the rest of the epoch, in another order
    fewer.seek(*position, state)
    rest = epoch_texts(fewer)
    resumed = rest[: rest.index("<next epoch>")]
    assert sorted(taken + resumed) == everything  # each sample once: none repeated, none left out
    assert fewer.state()["exact"] and fewer.epoch == 1  # the next epoch is dealt anew, to these readers
    fewer.close()


def test_a_run_resumes_with_other_readers(tmp_path: Path) -> None:
    """Through the trainer: the checkpoint keeps what the epoch took; the resumed run goes on
    with one reader where two began."""
    import shutil

    from qformer.train.loop import train
    from qformer.train.state import load_plain

    pattern = caption_shards(tmp_path / "shards", shards=4, per_shard=5)
    run = tmp_path / "run"
    args = ["--data.source", "shards", "--data.path", pattern, "--steps", "4", "--save_every", "2"]
    train(tiny(run, *args, "--data.num_workers", "2"))
    saved = load_plain(run / "step_0000002" / "trainer.pt")["data"]
    assert saved["readers"] == 2 and len(saved["places"]) + 5 * len(saved["done"]) == 2 * 4  # 2 batches of 4
    for name in ("step_0000004", "final"):
        shutil.rmtree(run / name)
    result = train(tiny(run, *args, "--data.num_workers", "0"), resume=True)
    assert result["step"] == 4 and not load_plain(run / "step_0000004" / "trainer.pt")["data"]["exact"]


def test_shard_names_from_patterns(tmp_path: Path) -> None:
    for i in range(3):
        write_tar_shard(tmp_path / f"{i:05d}.tar", [{"__key__": "k", "png": picture(i), "txt": "x"}])
    assert expand_shards(f"{tmp_path}/{{00000..00001}}.tar::{tmp_path}/0000[2].tar") == [
        f"{tmp_path}/00000.tar", f"{tmp_path}/00001.tar", f"{tmp_path}/00002.tar"]
    urls = expand_shards("pipe:aws s3 cp s3://bucket/cc12m/{0000..0002}.tar -::https://host/a/b.tar?sig=1")
    assert [shard_name(u) for u in urls] == ["0000.tar", "0001.tar", "0002.tar", "b.tar"]
    with pytest.raises(ValueError, match=r"shard file names must be unique.*00000.tar"):
        expand_shards(f"{tmp_path}/00000.tar::{tmp_path}/../{tmp_path.name}/00000.tar")
    with pytest.raises(ValueError, match="no tar shard matches"):
        expand_shards(f"{tmp_path}/nothing-*.tar")
    with pytest.raises(ValueError, match=r"00003.tar: no such tar shard"):
        expand_shards(f"{tmp_path}/{{00000..00009}}.tar")
    with pytest.raises(ValueError, match=r"is a folder: name its shards, e.g. '.*\*.tar'"):
        expand_shards(f"{tmp_path}/")


def test_the_rest_of_an_epoch_dealt_to_another_number_of_ranks(tmp_path: Path) -> None:
    """What one rank took, left out; the rest dealt to two ranks: each sample once."""
    from qformer.train.data import Consumed

    pattern = caption_shards(tmp_path / "shards", shards=6, per_shard=5)
    one = shard_batches(pattern, 0, tmp_path / "a")
    taken = [text for _ in range(7) for text in next(one)["texts"]]
    state = one.state()
    one.close()
    consumed = Consumed(frozenset(state["done"]), frozenset(state["places"]))
    rest = []
    for rank in (0, 1):
        reader = TarShardDataset(expand_shards(pattern), rank=rank, world_size=2, shuffle_seed=0, shuffle_buffer=3)
        rest += [s["text"] for _, s in TrainShards(reader, ImageConfig(size=16), 0).samples(0, 1, consumed=consumed)
                 if isinstance(s, dict)]
    assert sorted(taken + rest) == sorted(f"a picture number {n}" for n in range(30))


def test_a_shard_run_resumes_on_two_processes(tmp_path: Path) -> None:
    """Saved by one process, resumed by torchrun with two: the run goes on, the epoch without what it took."""
    import shutil

    from qformer.train.loop import train
    from qformer.train.state import load_plain
    from test_train import free_port, torchrun

    pattern = caption_shards(tmp_path / "shards", shards=8, per_shard=4)
    run = tmp_path / "run"
    args = ["--data.source", "shards", "--data.path", pattern, "--data.num_workers", "0", "--data.batch_size", "2",
            "--steps", "4", "--save_every", "2"]
    train(tiny(run, *args))
    for name in ("step_0000004", "final"):
        shutil.rmtree(run / name)
    two = torchrun("--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                   overrides=[*args, "--output_dir", str(run), "--resume"])
    output = two.communicate(timeout=300)[0]
    assert two.returncode == 0, output[-3000:]
    assert "resuming 2 process(es) from a checkpoint of 1: the global batch is now 4 samples (was 2)" in output
    data = load_plain(run / "step_0000004" / "trainer.pt")["data"]
    assert data["world"] == 2 and not data["exact"]
    assert len(data["places"]) + 4 * len(data["done"]) == 2 * 2 + 2 * 4  # 2 steps of 2, then 2 of 2 x 2
