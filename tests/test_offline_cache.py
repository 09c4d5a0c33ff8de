"""Offline, a hub id already in the local Hugging Face cache loads as it does online (docs/checkpoints.md
says so), and one that is not cached fails in one line; ``TRANSFORMERS_OFFLINE`` alone is read as
huggingface_hub reads it."""

from __future__ import annotations

import huggingface_hub.constants
import pytest

from qformer.loading import hub_offline, resolve_checkpoint
from qformer.pretrained.stage2 import Blip2
from stage2_helpers import save_tiny_blip2

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding a tiny BLIP-2 as the hub id ``someone/tiny-blip2``, in the
    layout huggingface_hub writes (a snapshot per revision, ``refs/main`` naming the one in use)."""
    repo = tmp_path / "hub" / "models--someone--tiny-blip2"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    save_tiny_blip2(snapshot, "opt")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_a_cached_hub_id_loads_offline(cache):
    assert resolve_checkpoint("someone/tiny-blip2") == cache
    model = Blip2.from_pretrained("someone/tiny-blip2")
    assert model.config.num_query_tokens == Blip2.from_pretrained(cache).config.num_query_tokens


def test_an_uncached_hub_id_fails_offline_in_one_line(cache):
    with pytest.raises(FileNotFoundError, match="nor a hub id in the local cache, and HF_HUB_OFFLINE is set") as err:
        resolve_checkpoint("someone/not-there")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("environment, offline", [
    ({}, False), ({"HF_HUB_OFFLINE": "1"}, True), ({"TRANSFORMERS_OFFLINE": "1"}, True),
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False), ({"HF_HUB_OFFLINE": "false"}, False),
])
def test_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, environment, offline):
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert hub_offline() is offline
