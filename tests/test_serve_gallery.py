"""The gallery of ``qformer serve`` while its folder changes under it, as a hostile client (or a
careless owner) changes it: images added and removed during searches, files swapped for links
to files outside the folder, FIFOs, files deleted between a search and the GET of its result.
Every answer is one the server can stand behind: a search answers from what it can read, a
file is served only while it is a regular file inside the folder, and no answer names the
server's paths."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from qformer import load_tokenizer
from qformer.serve.app import create_app
from qformer.serve.gallery import Gallery
from qformer.serve.limits import Limits
from qformer.serve.service import ServedModel
from serve_helpers import gallery_folder, png_bytes, running
from stage1_helpers import usable_stage1

LIMITS = Limits(max_top=10, max_wait_ms=20)


@pytest.fixture(scope="module")
def stage1_model(minilm_path):
    return usable_stage1(load_tokenizer(minilm_path))


@contextmanager
def served(stage1_model, folder: Path):
    """A server on loopback searching ``folder``; yields a client and the gallery."""
    gallery = Gallery(stage1_model, folder, fingerprint="tiny-stage1")
    with running(create_app(ServedModel(stage1_model, "tiny-stage1", gallery), LIMITS)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        yield client, gallery


def assert_no_path(response: httpx.Response, root: Path) -> None:
    """No answer names where the test's files lie (the gallery's folder, or anything outside it)."""
    for path in {str(root), str(root.resolve())}:
        assert path not in response.text, response.text


def assert_refused(response: httpx.Response, status: int, words: str, root: Path) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"] and words in body["error"] and "\n" not in body["error"], body
    assert_no_path(response, root)


def test_searches_answer_while_images_come_and_go(tmp_path, stage1_model):
    """30 and more searches while 40 images are added and 38 removed: each answers 200, from
    images that were there when it was sent or came later, and names no path."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(40):
        (folder / f"old{i}.png").write_bytes(png_bytes(i))
    removed: dict[str, float] = {}  # name -> when its removal had finished
    churning = threading.Event()
    churning.set()

    def churn() -> None:
        try:
            for i in range(40):
                (folder / f"new{i}.png").write_bytes(png_bytes(100 + i))
                if i < 38:
                    (folder / f"old{i}.png").unlink()
                    removed[f"old{i}.png"] = time.monotonic()
                time.sleep(0.02)
        finally:
            churning.clear()

    def search(i: int) -> None:
        sent = time.monotonic()
        response = client.post("/search", json={"text": f"picture number {i}", "top": 5})
        assert response.status_code == 200, response.text
        assert_no_path(response, tmp_path)
        results = response.json()["results"]
        assert results, "two old images are never removed: a search always has some to answer"
        for hit in results:
            assert not (hit["image"] in removed and removed[hit["image"]] < sent), (hit, "removed before the search")
            image = client.get(hit["url"])
            assert image.status_code in (200, 404), image.text  # 404: removed since the search answered
            assert_no_path(image, tmp_path)

    with served(stage1_model, folder) as (client, gallery), ThreadPoolExecutor(3) as pool:
        worker = threading.Thread(target=churn)
        worker.start()
        done = 0
        while churning.is_set() or done < 30:
            list(pool.map(search, range(done, done + 3)))
            done += 3
        worker.join()
        final = client.post("/search", json={"text": "anything", "top": 10})
        assert final.status_code == 200
        assert {hit["image"] for hit in final.json()["results"]} <= {p.name for p in folder.glob("*.png")}
        assert "new39.png" in gallery.names and "old0.png" not in gallery.names


def test_an_image_gone_since_it_was_indexed_is_passed_over(tmp_path, stage1_model):
    """At a search, an image removed (or turned into something else) since the last refresh is
    left out and the next best readable one takes its place; none left: no results, no error."""
    folder = gallery_folder(tmp_path / "photos", images=4)
    gallery = Gallery(stage1_model, folder, fingerprint="m")
    gallery.refresh()
    everything = gallery.search_text("a red square", top=4, k=4)
    best = everything[0].item
    (folder / best).unlink()
    (folder / everything[1].item).write_bytes(b"no longer a picture")
    left = gallery.search_text("a red square", top=4, k=2)  # no refresh: the index still names them
    assert [hit.item for hit in left] == [hit.item for hit in everything[2:]]
    for hit in everything[2:]:
        (folder / hit.item).unlink()
    assert gallery.search_text("a red square", top=4, k=4) == []


def test_a_file_gone_between_the_scan_and_its_stat_is_skipped(tmp_path, stage1_model, monkeypatch):
    """A refresh lists the folder, then stats each file: one removed in between is left out, as
    are links to nowhere and to themselves, instead of failing the refresh."""
    folder = gallery_folder(tmp_path / "photos", images=3)
    (folder / "nowhere.png").symlink_to(folder / "missing.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    listing = os.scandir

    @contextmanager
    def scandir_then_remove(path):
        with listing(path) as scan:
            entries = list(scan)
        (folder / "0.png").unlink()
        yield iter(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_remove)
    gallery = Gallery(stage1_model, folder, fingerprint="m")
    assert gallery.refresh() == {"added": 2, "removed": 0, "unreadable": 1, "images": 2, "texts": 3}
    assert sorted(gallery.names) == ["1.png", "2.png"]


def test_links_out_of_the_folder_are_neither_served_nor_searched(tmp_path, stage1_model):
    """An image renamed over by a link to a file outside the folder (between two searches) is
    not served (404) and no longer found; a link inside the folder to one of its images is fine;
    a link out of the folder at indexing time is unreadable, with why; a FIFO renamed over an
    image neither blocks the server nor is served."""
    folder = gallery_folder(tmp_path / "photos", images=5)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(99))
    (folder / "outside.png").symlink_to(secret)
    (folder / "alias.png").symlink_to("0.png")
    with served(stage1_model, folder) as (client, gallery):
        assert "a link to a file outside the gallery folder" in gallery.unreadable["outside.png"]
        assert client.get("/gallery/alias.png").content == (folder / "0.png").read_bytes()
        first = client.post("/search", json={"text": "a red square", "top": 10})
        assert "4.png" in {hit["image"] for hit in first.json()["results"]}
        (tmp_path / "link").symlink_to(secret)
        os.replace(tmp_path / "link", folder / "4.png")
        assert_refused(client.get("/gallery/4.png"), 404, "4.png: a link to a file outside the gallery folder",
                       tmp_path)
        for name in ("outside.png", "secret.png", "..%2Fsecret.png"):
            got = client.get(f"/gallery/{name}")
            assert got.status_code == 404 and got.content != secret.read_bytes()
        second = client.post("/search", json={"text": "a red square", "top": 10})
        assert second.status_code == 200 and "4.png" not in {hit["image"] for hit in second.json()["results"]}
        assert_no_path(second, tmp_path)
        assert "outside the gallery folder" in gallery.unreadable["4.png"]
        os.mkfifo(tmp_path / "fifo")
        os.replace(tmp_path / "fifo", folder / "3.png")
        assert_refused(client.get("/gallery/3.png"), 404, "3.png: not a regular file", tmp_path)


def test_a_swap_during_the_open_is_caught_by_the_check_after_it(tmp_path, stage1_model, monkeypatch):
    """The check runs on what was opened: a link out of the folder opened, then the real image
    put back before the check (the path now looks fine), is refused, as is the converse."""
    folder = gallery_folder(tmp_path / "photos", images=2)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes(99))
    gallery = Gallery(stage1_model, folder, fingerprint="m")
    opening = os.open

    def open_then_swap(path, flags, *args, **kwargs):
        descriptor = opening(path, flags, *args, **kwargs)
        os.replace(tmp_path / "swap", path)
        return descriptor

    monkeypatch.setattr(os, "open", open_then_swap)
    (tmp_path / "swap").write_bytes((folder / "0.png").read_bytes())
    os.replace(folder / "0.png", tmp_path / "kept.png")
    (folder / "0.png").symlink_to(secret)  # opened: the secret; checked: a regular file inside
    with pytest.raises(ValueError, match="^0.png: replaced while it was opened$"):
        gallery.open_file("0.png")
    (tmp_path / "swap").symlink_to(secret)  # opened: the image; checked: a link out
    with pytest.raises(ValueError, match="^1.png: a link to a file outside the gallery folder$"):
        gallery.open_file("1.png")
    monkeypatch.undo()
    with gallery.open_file("0.png") as file:
        assert file.read() == (tmp_path / "kept.png").read_bytes()


def test_result_urls_serve_the_image_until_it_is_deleted(tmp_path, stage1_model):
    """A result's URL serves its bytes (its name percent-encoded); deleted, it answers 404."""
    folder = tmp_path / "photos"
    folder.mkdir()
    name = "50% a#b?.png"
    (folder / name).write_bytes(png_bytes(5))
    with served(stage1_model, folder) as (client, _):
        hit = client.post("/search", json={"text": "green grass", "top": 1}).json()["results"][0]
        assert hit["image"] == name and hit["url"] == "/gallery/50%25%20a%23b%3F.png"
        served_image = client.get(hit["url"])
        assert served_image.status_code == 200 and served_image.content == (folder / name).read_bytes()
        assert served_image.headers["content-type"] == "image/png"
        (folder / name).unlink()
        assert_refused(client.get(hit["url"]), 404, f"gallery image {name}: gone from the gallery", tmp_path)


def test_refusals_name_no_path_of_the_server(tmp_path, stage1_model):
    """A gallery with no readable image, no texts.txt (removed while serving), or a texts.txt
    that links out of the folder: each search answers 400 in words that name no folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "texts.txt").write_text("a red square\n")
    with served(stage1_model, folder) as (client, gallery):
        assert_refused(client.post("/search", json={"text": "a red square"}), 400,
                       "the gallery holds no readable image (1 unreadable)", tmp_path)
        assert "broken.png: cannot read image" in gallery.unreadable["broken.png"]
        image = {"image": ("a.png", png_bytes(), "image/png")}
        assert client.post("/search", files=image).status_code == 200
        (folder / "texts.txt").unlink()
        assert_refused(client.post("/search", files=image), 400, "the gallery has no texts.txt", tmp_path)
        (tmp_path / "elsewhere.txt").write_text("a secret line\n")
        (folder / "texts.txt").symlink_to(tmp_path / "elsewhere.txt")
        assert_refused(client.post("/search", files=image), 400, "the gallery has no texts.txt", tmp_path)
