"""The page of ``qformer serve`` in a real headless Chromium (selenium + chromedriver), against a real
server on loopback with tiny models: a caption (whole and streamed), questions and their history,
a gallery search, a match, a broken file, a file over the limit, no answer from the server, a
phone-sized screen, and /docs and /redoc drawn with no host but the server reachable. Screenshots
go to $QFORMER_SCREENSHOTS (relative to the repo root, e.g. test-screenshots/, which git ignores)
when set, else to a pytest temporary folder: a test does not write into the source tree unless
asked to."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    pytest.skip("the page's browser test needs selenium: pip install selenium (in the test extra)",
                allow_module_level=True)

import httpx
from PIL import Image

from qformer import load_tokenizer
from qformer.serve.app import create_app
from qformer.serve.server import load_served
from serve_helpers import gallery_folder, running
from stage1_helpers import usable_stage1
from stage2_helpers import save_tiny_blip2

ROOT = Path(__file__).resolve().parents[1]


def _find(names: tuple[str, ...], fallbacks: tuple[str, ...]) -> str | None:
    """The first of ``names`` on PATH, else the first executable of ``fallbacks``."""
    for name in names:
        if found := shutil.which(name):
            return found
    return next((path for path in fallbacks if os.access(path, os.X_OK)), None)


CHROMIUM = _find(("chromium", "chromium-browser", "google-chrome"), ("/usr/bin/chromium",))
CHROMEDRIVER = _find(("chromedriver",), ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"))
if CHROMIUM is None or CHROMEDRIVER is None:
    missing = " and ".join(name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path)
    pytest.skip(f"the page's browser test needs {missing}: apt-get install chromium chromium-driver",
                allow_module_level=True)

WAIT_S = 20
PHONE = (390, 844)


@pytest.fixture(scope="module")
def stage2_url(tmp_path_factory) -> Iterator[str]:
    """A tiny stage-2 model (OPT) served as ``qformer serve --model DIR`` serves it."""
    directory = tmp_path_factory.mktemp("tiny-blip2-opt")
    save_tiny_blip2(directory, "opt")
    with running(create_app(load_served(str(directory), "cpu", "float32", None, None))) as url:
        yield url


@pytest.fixture(scope="module")
def stage1_url(tmp_path_factory, minilm_path) -> Iterator[str]:
    """A tiny stage-1 model with a real tokenizer and a gallery (one picture much wider than a phone)."""
    directory = tmp_path_factory.mktemp("tiny-stage1")
    usable_stage1(load_tokenizer(minilm_path)).save_pretrained(directory)
    gallery = gallery_folder(tmp_path_factory.mktemp("gallery"), images=4)
    Image.new("RGB", (1200, 200), (240, 160, 20)).save(gallery / "wide.png")
    with running(create_app(load_served(str(directory), "cpu", "float32", str(gallery), None))) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module, 1280 x 900 (the phone test narrows it), that can reach
    no host but 127.0.0.1: a page that loaded anything from elsewhere (a CDN) would fail here as it
    does offline."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--hide-scrollbars",
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    except WebDriverException as err:
        pytest.skip(f"chromium did not start under chromedriver ({err.msg}); check chromium and chromium-driver "
                    "are the same version")
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(autouse=True)
def no_script_errors(browser: webdriver.Chrome) -> Iterator[None]:
    """Each test fails on an error of the page's script in the console (a refused request's
    "Failed to load resource" line is the answer the test asked for, not an error of the page)."""
    browser.get_log("browser")  # what the previous test left
    yield
    errors = [entry["message"] for entry in browser.get_log("browser")
              if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]
    assert not errors, errors


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the screenshots are left in for people to look at: $QFORMER_SCREENSHOTS when
    set, else a temporary one (the source tree may be read-only, or shared by other checkouts)."""
    chosen = os.environ.get("QFORMER_SCREENSHOTS")
    if not chosen:
        return tmp_path_factory.mktemp("screenshots")
    folder = Path(chosen)
    folder = folder if folder.is_absolute() else ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """A red picture, a blue one, and a file named .png that holds no image."""
    folder = tmp_path_factory.mktemp("pictures")
    files = {"red": folder / "red.png", "blue": folder / "blue.jpg", "broken": folder / "broken.png"}
    Image.new("RGB", (64, 48), (200, 30, 30)).save(files["red"])
    Image.new("RGB", (48, 64), (20, 40, 210)).save(files["blue"])
    files["broken"].write_bytes(b"these bytes are not an image at all")
    return files


def snap(browser: webdriver.Chrome, shots: Path, name: str, capsys: pytest.CaptureFixture) -> None:
    """A screenshot of the whole page (beyond the window too), its path said on the terminal."""
    path = shots / f"{name}.png"
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 1000, path
    with capsys.disabled():
        print(f"\n  screenshot: {path}")


def wait(browser: webdriver.Chrome, condition: Callable[[], object], message: str) -> object:
    """``condition()`` once it is true (polled), or a timeout naming ``message``."""
    return WebDriverWait(browser, WAIT_S, poll_frequency=0.05).until(lambda driver: condition(), message)


def text_of(browser: webdriver.Chrome, css: str) -> str:
    """The visible text of the element at ``css``."""
    return browser.find_element(By.CSS_SELECTOR, css).text


def open_page(browser: webdriver.Chrome, url: str, ready: str) -> None:
    """Load the page and wait for /info to have shown the panel ``ready``."""
    browser.get(url + "/")
    wait(browser, lambda: browser.find_element(By.ID, ready).is_displayed(), f"#{ready} never showed")


def post_like_the_page(url: str, route: str, file: Path, **fields: str) -> httpx.Response:
    """What the server answers the page's request, asked directly."""
    with file.open("rb") as handle:
        return httpx.post(f"{url}/{route}", files={"image": (file.name, handle)}, data=fields, timeout=60)


def hold_requests(browser: webdriver.Chrome) -> None:
    """Make the page's fetches wait until release_requests (so its busy state can be seen)."""
    browser.execute_script("""
        window.__fetch = window.fetch;
        window.__held = [];
        window.fetch = (...args) => new Promise(
            (resolve) => window.__held.push(() => resolve(window.__fetch(...args))));
    """)


def release_requests(browser: webdriver.Chrome) -> None:
    """Let the held fetches go, and the later ones through at once."""
    browser.execute_script("window.fetch = window.__fetch; window.__held.forEach((go) => go());")


def test_caption_stream_questions_and_busy_state(browser, stage2_url, pictures, shots, capsys):
    open_page(browser, stage2_url, "caption-panel")
    assert browser.find_element(By.ID, "vqa-panel").is_displayed()
    for stage1_only in ("search-panel", "match-panel"):
        assert not browser.find_element(By.ID, stage1_only).is_displayed(), stage1_only
    assert not browser.find_element(By.ID, "error").is_displayed()

    browser.find_element(By.ID, "file").send_keys(str(pictures["red"]))
    wait(browser, lambda: browser.execute_script(
        "const p = document.getElementById('preview'); return !p.hidden && p.complete && p.naturalWidth === 64;"),
        "no preview of the chosen image")

    expected = post_like_the_page(stage2_url, "caption", pictures["red"])
    assert expected.status_code == 200, expected.text
    caption = expected.json()["caption"]
    button = browser.find_element(By.ID, "caption-button")
    hold_requests(browser)
    button.click()
    assert not button.is_enabled() and button.text == "working…"
    release_requests(browser)
    wait(browser, lambda: text_of(browser, "#caption") == caption, f"the caption {caption!r} never showed")
    wait(browser, lambda: button.is_enabled() and button.text == "Caption", "the button stayed busy")

    # streamed (greedy, so its own caption): written as it comes, each SSE text landing in #caption
    streamed = post_like_the_page(stage2_url, "caption", pictures["red"], stream="true")
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    caption = json.loads(streamed.text.strip().split("event: done\ndata: ")[1])["caption"]
    browser.execute_script("""
        window.__seen = [];
        new MutationObserver(() => window.__seen.push(document.getElementById('caption').textContent))
            .observe(document.getElementById('caption'), {childList: true, characterData: true, subtree: true});
    """)
    browser.find_element(By.ID, "stream").click()
    assert browser.find_element(By.ID, "stream").is_selected()
    button.click()
    wait(browser, lambda: button.is_enabled() and text_of(browser, "#caption") == caption,
         "the streamed caption never completed")
    seen = [text for text in browser.execute_script("return window.__seen") if text]
    assert seen and seen[-1] == caption, seen
    assert all(caption.startswith(text.strip()) for text in seen), seen  # the text so far, growing
    browser.find_element(By.ID, "stream").click()

    # eleven questions: the history keeps the last ten, newest first, each answer with its seconds
    questions = ["what colour is it?", "is there a ball?"] + [f"is it number {i}?" for i in range(9)]
    answers = {}  # the server's own answers to the newest and the oldest kept (the rest: some text)
    for question in (questions[1], questions[-1]):
        reply = post_like_the_page(stage2_url, "vqa", pictures["red"], question=question)
        assert reply.status_code == 200, reply.text
        answers[question] = reply.json()["answer"]
    box = browser.find_element(By.ID, "question")
    for asked, question in enumerate(questions, start=1):
        box.send_keys(question)
        browser.find_element(By.ID, "ask-button").click()
        wait(browser, lambda asked_now=question: browser.find_element(By.ID, "ask-button").is_enabled() and text_of(
            browser, "#history li:first-child .q") == asked_now, f"{question!r} is not on top of the history")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#history li")) == min(asked, 10)
        assert box.get_attribute("value") == ""
    rows = browser.find_elements(By.CSS_SELECTOR, "#history li")
    shown = [(row.find_element(By.CSS_SELECTOR, ".q").text, row.find_element(By.CSS_SELECTOR, ".a").text)
             for row in rows]
    assert [q for q, _ in shown] == questions[::-1][:10]
    for question, answer_shown in shown:
        answer = answers.get(question, "")
        assert answer_shown.startswith(answer) and re.search(r"\S \(\d+\.\d\d s\)$", answer_shown), answer_shown
    assert not browser.find_element(By.ID, "error").is_displayed()
    snap(browser, shots, "desktop-stage2", capsys)


def test_drop_an_image(browser, stage2_url):
    """An image dropped on the drop zone (a drop event carrying a file, as a browser makes one) is
    the image captioned."""
    open_page(browser, stage2_url, "caption-panel")
    browser.execute_script("""
        const canvas = document.createElement('canvas');
        canvas.width = 40; canvas.height = 30;
        const paint = canvas.getContext('2d');
        paint.fillStyle = '#2a8'; paint.fillRect(0, 0, 40, 30);
        canvas.toBlob((blob) => {
            const carried = new DataTransfer();
            carried.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
            const zone = document.getElementById('drop');
            zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: carried, bubbles: true, cancelable: true}));
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: carried, bubbles: true, cancelable: true}));
        }, 'image/png');
    """)
    wait(browser, lambda: text_of(browser, "#file-name").startswith("dropped.png"), "the dropped file was not taken")
    wait(browser, lambda: browser.execute_script(
        "const p = document.getElementById('preview'); return !p.hidden && p.complete && p.naturalWidth === 40;"),
        "no preview of the dropped image")
    assert "over" not in browser.find_element(By.ID, "drop").get_attribute("class")
    browser.find_element(By.ID, "caption-button").click()
    wait(browser, lambda: browser.find_element(By.ID, "caption-button").is_enabled()
         and text_of(browser, "#caption") != "", "the dropped image got no caption")
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_errors_are_shown_in_words(browser, stage2_url, pictures, tmp_path, shots, capsys):
    open_page(browser, stage2_url, "caption-panel")
    error = browser.find_element(By.ID, "error")
    assert error.get_attribute("role") == "alert"

    # nothing chosen yet
    browser.find_element(By.ID, "caption-button").click()
    wait(browser, error.is_displayed, "no error for a caption without an image")
    assert "choose an image" in error.text

    # bytes that are not an image: the server's own message
    refused = post_like_the_page(stage2_url, "caption", pictures["broken"])
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]
    browser.find_element(By.ID, "file").send_keys(str(pictures["broken"]))
    wait(browser, lambda: not error.is_displayed(), "choosing a file kept the old error")
    browser.find_element(By.ID, "caption-button").click()
    wait(browser, lambda: error.is_displayed() and error.text == message, f"#error never said {message!r}")
    assert text_of(browser, "#caption") == "" and "Traceback" not in browser.page_source
    snap(browser, shots, "desktop-error", capsys)

    # a file over the limit is refused before it is sent, the limit named
    limit = httpx.get(stage2_url + "/info").json()["limits"]["max_upload_bytes"]
    big = tmp_path / "big.png"
    with big.open("wb") as handle:
        handle.truncate(limit + 1)
    browser.find_element(By.ID, "file").send_keys(str(big))
    wait(browser, lambda: error.is_displayed() and str(limit) in error.text, "a file over the limit was not refused")
    assert "big.png" in error.text

    # the server does not answer
    browser.find_element(By.ID, "file").send_keys(str(pictures["red"]))
    browser.execute_script("window.fetch = () => Promise.reject(new TypeError('Failed to fetch'));")
    browser.find_element(By.ID, "question").send_keys("anyone there?")
    browser.find_element(By.ID, "ask-button").click()
    wait(browser, lambda: error.is_displayed() and error.text == "the server did not answer",
         "no word of a server that did not answer")
    assert browser.find_element(By.ID, "ask-button").is_enabled()
    assert browser.find_elements(By.CSS_SELECTOR, "#history li") == []


def test_search_the_gallery(browser, stage1_url, shots, capsys):
    open_page(browser, stage1_url, "search-panel")
    assert browser.find_element(By.ID, "match-panel").is_displayed()
    assert browser.find_element(By.ID, "image-panel").is_displayed()
    assert not browser.find_element(By.ID, "vqa-panel").is_displayed()
    # a stage-1 model captions with its Q-Former: no prompt to continue, no stream
    assert browser.find_element(By.ID, "caption-panel").is_displayed()
    assert not browser.find_element(By.ID, "stream").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "#caption-form summary").click()
    assert browser.find_element(By.ID, "num-beams").is_displayed()
    assert not browser.find_element(By.ID, "prompt").is_displayed()

    query = "a red picture"
    expected = httpx.post(stage1_url + "/search", json={"text": query, "top": 3}, timeout=60)
    assert expected.status_code == 200, expected.text
    ranked = expected.json()["results"]
    assert len(ranked) >= 2
    top = browser.find_element(By.ID, "search-top")
    top.clear()
    top.send_keys("3")
    browser.find_element(By.ID, "search-text").send_keys(query)
    browser.find_element(By.ID, "search-button").click()
    items = "#results li"
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, items)) == len(ranked), "no ranked images")
    names = [element.text for element in browser.find_elements(By.CSS_SELECTOR, f"{items} .name")]
    assert names == [f"{rank}. {hit['image']}" for rank, hit in enumerate(ranked, start=1)]
    scores = [element.text for element in browser.find_elements(By.CSS_SELECTOR, f"{items} .score")]
    assert scores == [f"score {hit['score']:.3f} · itc {hit['itc']:.3f}" for hit in ranked]
    wait(browser, lambda: browser.execute_script(
        "return [...document.querySelectorAll('#results img')].every((i) => i.complete && i.naturalWidth > 0);"),
        "a ranked image did not load from /gallery")
    assert not browser.find_element(By.ID, "error").is_displayed()
    snap(browser, shots, "desktop-search", capsys)


def test_match_texts(browser, stage1_url, pictures, shots, capsys):
    open_page(browser, stage1_url, "match-panel")
    texts = ["a red square", "a blue sky"]
    with pictures["red"].open("rb") as handle:
        matched = httpx.post(stage1_url + "/match", files={"image": ("red.png", handle)},
                             data={"texts": texts}, timeout=60)
    assert matched.status_code == 200, matched.text
    browser.find_element(By.ID, "file").send_keys(str(pictures["red"]))
    browser.find_element(By.ID, "match-texts").send_keys("\n".join(texts))
    browser.find_element(By.ID, "match-button").click()
    rows = "#match-results tbody tr"
    wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, rows)) == len(texts), "no match scores")
    table = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
             for row in browser.find_elements(By.CSS_SELECTOR, rows)]
    body = matched.json()
    assert table == [[text, f"{itm:.3f}", f"{itc:.3f}"]
                     for text, itm, itc in zip(texts, body["itm"], body["itc"], strict=True)]
    assert not browser.find_element(By.ID, "error").is_displayed()
    snap(browser, shots, "desktop-match", capsys)


PHONE_CHECKS = """
    const page = document.documentElement;
    const small = [];
    // a checkbox is tapped through its label, which is measured instead
    const targets = 'button, input:not([type=file]):not([type=checkbox]), textarea, summary, label.check';
    for (const element of document.querySelectorAll(targets)) {
        const box = element.getBoundingClientRect();
        if (box.width && box.height && (box.height < 44 || box.width < 44)) small.push(element.id || element.outerHTML);
    }
    const panels = [...document.querySelectorAll('section.panel')].filter((s) => !s.hidden)
        .map((s) => s.getBoundingClientRect());
    const images = [...document.querySelectorAll('img')].filter((i) => i.getBoundingClientRect().width)
        .map((i) => i.getBoundingClientRect().right);
    return {scroll: page.scrollWidth, width: window.innerWidth, small: small,
            lefts: [...new Set(panels.map((p) => Math.round(p.left)))], rights: images};
"""


def test_phone_screen(browser, stage2_url, stage1_url, pictures, shots, capsys):
    width, height = PHONE
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True})
    try:
        for url, ready, name in ((stage2_url, "caption-panel", "phone-stage2"), (stage1_url, "search-panel",
                                                                                  "phone-stage1")):
            open_page(browser, url, ready)
            browser.find_element(By.ID, "file").send_keys(str(pictures["blue"]))
            if ready == "caption-panel":
                browser.find_element(By.ID, "caption-button").click()
                wait(browser, lambda: text_of(browser, "#caption") != "", "no caption on the phone")
            else:
                browser.find_element(By.ID, "search-text").send_keys("something wide")
                browser.find_element(By.ID, "search-button").click()
                wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#results li img"), "no results")
            wait(browser, lambda: browser.execute_script(
                "return [...document.querySelectorAll('img')].every((i) => i.hidden || i.complete);"), "images")
            layout = browser.execute_script(PHONE_CHECKS)
            assert layout["width"] == width, layout
            assert layout["scroll"] <= width, f"{name}: the page scrolls sideways ({layout['scroll']} > {width})"
            assert len(layout["lefts"]) == 1, f"{name}: the panels are not one column: {layout}"
            assert not layout["small"], f"{name}: tap targets under 44 px: {layout['small']}"
            assert all(right <= width for right in layout["rights"]), f"{name}: an image wider than the screen"
            snap(browser, shots, name, capsys)
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_docs_and_redoc_render_from_this_server_alone(browser, stage2_url, shots, capsys):
    """/docs draws Swagger UI and /redoc ReDoc, with the routes, from files the server sends: the
    browser reaches no other host, and every file the pages loaded came from the server, but for
    the Redocly logo that ReDoc's script asks for (it hides itself when that fails)."""
    browser.get(stage2_url + "/docs")
    wait(browser, lambda: {"/caption", "/vqa"} <= {path.text for path in browser.find_elements(
        By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path")}, "Swagger UI never listed /caption and /vqa")
    snap(browser, shots, "docs", capsys)
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((entry) => entry.name)")
    assert loaded and all(url.startswith(stage2_url + "/") for url in loaded), loaded
    browser.get(stage2_url + "/redoc")
    wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".redoc-wrap") and "/caption" in browser.page_source,
         "ReDoc never showed /caption")
    snap(browser, shots, "redoc", capsys)
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((entry) => entry.name)")
    outside = [url for url in loaded if not url.startswith(stage2_url + "/")]
    assert len(loaded) > len(outside) and set(outside) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, loaded
