"""Tar shards from wherever ``data.path`` names them: a loopback HTTP server (brace-expanded
URLs), ``pipe:`` commands, fsspec's in-memory filesystem (``memory://``), ``file://`` URLs
and local paths all give the same samples. Over HTTP a missing shard is a lost shard, a shard
cut short counts what it lost from the stats file served beside it, and a training run reads
its shards from the server. An unknown scheme is refused in one line."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch

from qformer.data.datasets import Skipped
from qformer.data.shards import TarShardDataset, expand_shards
from qformer.train.loop import train
from test_hostile_data import cut, shard
from test_train import caption_shards, tiny

SHARDS, PER_SHARD = 4, 5
NAMES = "part-{000..003}.tar"  # caption_shards' files, brace-expanded


def _reads_http() -> bool:
    """Whether open_shard can read http:// here: curl for webdataset's gopen, or fsspec's HTTP
    filesystem (its aiohttp installed)."""
    try:
        fsspec.get_filesystem_class("http")
    except ImportError:
        return shutil.which("curl") is not None
    return True


pytestmark = pytest.mark.skipif(not _reads_http(), reason="http:// needs curl or fsspec's HTTP filesystem (aiohttp)")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        """No line per request on stderr."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The served folder: caption_shards' 4 shards of 5, each with img2dataset's stats file;
    ``cut/``: a shard of 30 cut in its tenth sample with its stats file, and one without."""
    root = tmp_path_factory.mktemp("served")
    caption_shards(root / "shards", shards=SHARDS, per_shard=PER_SHARD)
    for s in range(SHARDS):
        (root / "shards" / f"part-{s:03d}_stats.json").write_text(json.dumps({"successes": PER_SHARD}))
    (root / "cut").mkdir()
    for name, key in (("00000", "b"), ("00001", "c")):
        cut(shard(root / "cut" / f"{name}.tar", 30, key), f"{key}0009.png")
    (root / "cut" / "00000_stats.json").write_text(json.dumps({"successes": 30}))
    return root


@pytest.fixture(scope="module")
def url(folder: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT``, a ThreadingHTTPServer serving ``folder`` (no proxy in between)."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    with pytest.MonkeyPatch.context() as env:
        for name in ("no_proxy", "NO_PROXY"):
            env.setenv(name, "127.0.0.1,localhost")
        yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def in_memory(folder: Path) -> Iterator[str]:
    """The shards and stats files copied into fsspec's in-memory filesystem: their ``memory://`` folder."""
    memory = fsspec.filesystem("memory")
    base = f"/{folder.name}"
    for path in sorted((folder / "shards").iterdir()):
        memory.pipe(f"{base}/{path.name}", path.read_bytes())
    yield f"memory://{base.lstrip('/')}"
    memory.rm(base, recursive=True)


def read(pattern: str) -> list[Skipped | tuple[str, int, tuple[int, int], bytes]]:
    """What the shards of ``pattern`` give, in order: each sample as (caption, image id, image
    size, pixel bytes), an unreadable one as its Skipped."""
    return [s if isinstance(s, Skipped) else (s["text"], s["image_id"], s["image"].size, s["image"].tobytes())
            for s in TarShardDataset(expand_shards(pattern))]


@pytest.mark.parametrize("source", ["http", "pipe", "memory", "file", "local braces"])
def test_every_source_gives_the_same_samples(folder: Path, url: str, in_memory: str, source: str) -> None:
    local = folder / "shards"
    pattern = {"http": f"{url}/shards/{NAMES}", "pipe": f"pipe:cat {local}/{NAMES}", "memory": f"{in_memory}/{NAMES}",
               "file": f"file://{local}/{NAMES}", "local braces": f"{local}/{NAMES}"}[source]
    assert len(expand_shards(pattern)) == SHARDS
    expected = read(str(local / "part-*.tar"))  # a local glob
    assert [sample[0] for sample in expected] == [f"a picture number {n}" for n in range(SHARDS * PER_SHARD)]
    assert read(pattern) == expected  # none skipped: the stats files agree with the shards


def test_a_missing_http_shard_is_a_lost_shard(url: str) -> None:
    dataset = TarShardDataset(expand_shards(f"{url}/shards/part-{{003..004}}.tar"))
    samples = list(dataset)
    assert [s["text"] for s in samples[:PER_SHARD]] == [f"a picture number {n}" for n in range(15, 20)]
    assert len(samples) == PER_SHARD + 1 and isinstance(samples[-1], Skipped)
    assert samples[-1].name == f"{url}/shards/part-004.tar" and samples[-1].count == 1
    assert "at least 1 sample lost" in samples[-1].reason and dataset.skipped == 1


def test_a_cut_http_shard_counts_its_loss_from_the_stats_file_beside_it(url: str) -> None:
    """Cut inside its tenth sample: 9 samples read, 21 of the 30 its stats file lists lost;
    without a stats file beside it, a URL's loss is at least the sample cut."""
    dataset = TarShardDataset(expand_shards(f"{url}/cut/{{00000..00001}}.tar"))
    samples = list(dataset)
    assert len(samples) == 2 * (9 + 1)
    counted, estimated = samples[9], samples[19]
    assert isinstance(counted, Skipped) and counted.name == f"{url}/cut/00000.tar" and counted.count == 21
    assert "21 of its 30 samples lost (as its stats file says)" in counted.reason
    assert isinstance(estimated, Skipped) and estimated.count == 1
    assert "at least 1 sample lost (00001_stats.json beside it" in estimated.reason
    assert dataset.skipped == 22


def test_an_unknown_scheme_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"^foo://x\.tar: no reader for foo:// \(install fsspec's library") as error:
        list(TarShardDataset(expand_shards("foo://x.tar")))
    assert "\n" not in str(error.value)


def test_training_reads_its_shards_over_http(url: str, tmp_path: Path) -> None:
    result = train(tiny(tmp_path / "run", "--data.source", "shards", "--data.path", f"{url}/shards/{NAMES}",
                        "--steps", "2"))
    assert result["step"] == 2 and torch.isfinite(torch.tensor(result["loss"]))
    assert (tmp_path / "run" / "final" / "config.json").is_file()
