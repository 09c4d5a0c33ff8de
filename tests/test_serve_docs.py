"""``/docs`` and ``/redoc`` of ``qformer serve`` work offline: every file they load comes from the
server itself (fastapi-offline's copies of Swagger UI and ReDoc), not from a CDN.
(tests/test_serve_page.py renders both in a browser that can reach no other host.)"""

from __future__ import annotations

from collections.abc import Iterator
from html.parser import HTMLParser

import httpx
import pytest

from qformer.serve.app import create_app
from qformer.serve.service import ServedModel
from serve_helpers import metric, running

ASSETS_URL = "/docs-assets"  # where create_app serves the pages' files

# What each kind of file must be sent as, and the least it can weigh (Swagger UI's script is ~1.5 MB,
# ReDoc's ~1 MB, the stylesheet ~180 kB, the icon ~600 bytes): an empty or stub file would pass a 200.
EXPECTED = {".js": (("text/javascript", "application/javascript"), 100_000), ".css": (("text/css",), 50_000),
            ".png": (("image/png",), 300)}


class Loaded(HTMLParser):
    """The URLs a page loads by itself: each script's src, link's href and img's src."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]


def loaded(html: str) -> list[str]:
    parser = Loaded()
    parser.feed(html)
    return parser.urls


@pytest.fixture(scope="module")
def client(blip2) -> Iterator[httpx.Client]:
    with running(create_app(ServedModel(blip2, "tiny-blip2"))) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_files_this_server_sends(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = loaded(response.text)
    assert any(url.endswith(".js") for url in urls), urls
    for url in urls:
        assert url.startswith(ASSETS_URL + "/"), f"{page} loads {url}, not a file of this server"
        asset = client.get(url)
        kinds, least = EXPECTED[url[url.rindex("."):]]
        assert asset.status_code == 200, (url, asset.status_code)
        assert asset.headers["content-type"].split(";")[0] in kinds, (url, asset.headers["content-type"])
        assert len(asset.content) >= least, (url, len(asset.content))
    assert "/openapi.json" in response.text  # what the page draws
    spec = client.get("/openapi.json")
    assert spec.status_code == 200 and "/caption" in spec.json()["paths"]
    metrics = client.get("/metrics").text
    assert metric(metrics, f'qformer_requests_total{{route="{page[1:]}",status="200"}}') >= 1
    assert metric(metrics, 'qformer_requests_total{route="docs-assets",status="200"}') >= len(urls)
    assert client.get(ASSETS_URL + "/no-such-file.js").status_code == 404
