"""The Gradio Space in a real headless browser (issue 16.6): the app is started on 127.0.0.1 on a free port, Debian's
chromium is driven by playwright; an empty press must say what to do (no bare "Error" badges), an upload then a
press must show the two pictures at equal height and the summary, and a new upload must clear the old outputs.

Runs where gradio, playwright and chromium are installed (the test extra, and `make browser` / .ci/run for
chromium); it is skipped elsewhere, except under CI (CI=true), where a missing piece fails."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from test_handler import _load_module

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "app" / "examples"
SCREENSHOTS = os.environ.get("MASK2ANOMALY_SCREENSHOTS")  # a folder to keep the page's screenshots in


def _need(condition: bool, what: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run the browser test: the test extra and `make browser` install it)")
    pytest.skip(what)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    _need(path is not None, "no chromium on PATH (Debian: apt-get install chromium, or `make browser`)")
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    """The Space app, serving the demo model re-saved with this package's remote code, at a local URL."""
    for module in ("gradio", "playwright"):
        try:
            __import__(module)
        except ImportError:
            _need(False, f"{module} is not installed (pip install -e '.[test]')")
    from modeling_mask2anomaly import Mask2AnomalyForUniversalSegmentation, Mask2AnomalyImageProcessor

    folder = tmp_path_factory.mktemp("space") / "model"
    Mask2AnomalyForUniversalSegmentation.from_pretrained(REPO / "demo_model").save_pretrained(folder)
    Mask2AnomalyImageProcessor.from_pretrained(REPO / "demo_model").save_pretrained(folder)
    os.environ["MASK2ANOMALY_MODEL"] = str(folder)
    app = _load_module(REPO / "app" / "app.py", "mask2anomaly_space_app_browser")
    demo = app.build_demo()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", app
    finally:
        demo.close()
        os.environ.pop("MASK2ANOMALY_MODEL", None)
        for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def browser_page(page_url):
    from playwright.sync_api import sync_playwright

    url, app = page_url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url, wait_until="networkidle")
        yield page, app
        browser.close()


def _summary(page) -> str:
    return page.get_by_label("Summary").input_value()


def _shot(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def _wait_for_summary(page, text: str, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = _summary(page)
        if text in value:
            return value
        page.wait_for_timeout(250)
    raise AssertionError(f"the summary never showed {text!r}; it reads {_summary(page)!r}")


def _error_badges(page) -> int:
    return page.get_by_text("Error", exact=True).count()


def test_empty_press_says_what_to_do(browser_page):
    page, app = browser_page
    page.get_by_role("button", name=app.BUTTON).click()
    page.wait_for_timeout(1500)
    _shot(page, "1_empty_press")
    assert _summary(page) == app.NO_IMAGE
    assert _error_badges(page) == 0


def test_upload_and_press_show_both_pictures_and_the_summary(browser_page):
    page, app = browser_page
    page.locator("#source input[type=file]").set_input_files(str(EXAMPLES / "synthroad_anomaly_000001.png"))
    _wait_for_summary(page, "Press Find anomalies.")
    page.get_by_role("button", name=app.BUTTON).click()
    summary = _wait_for_summary(page, "max anomaly score")
    _shot(page, "2_result")
    assert summary.startswith("256x128 image: max anomaly score ")
    assert "(mask2anomaly score, colour scale 0 .. 1)" in summary
    assert "anomalous area " in summary and "(score > 0.5)" in summary
    assert _error_badges(page) == 0
    pictures = [page.locator(f"#{name} img") for name in ("heatmap", "semantic")]
    boxes = []
    for picture in pictures:
        picture.wait_for(state="visible")
        boxes.append(picture.bounding_box())
    assert all(box["height"] > 150 for box in boxes), boxes
    assert abs(boxes[0]["height"] - boxes[1]["height"]) <= 2, boxes
    assert abs(boxes[0]["y"] - boxes[1]["y"]) <= 2, boxes
    # a new upload clears the previous outputs
    page.locator("#source input[type=file]").set_input_files(str(EXAMPLES / "synthroad_obstacle_000001.png"))
    _wait_for_summary(page, "Press Find anomalies.")
    assert page.locator("#heatmap img").count() == 0 and page.locator("#semantic img").count() == 0
    _shot(page, "3_new_upload")


def test_examples_ship_inside_the_app_folder(browser_page):
    page, app = browser_page
    examples = app.example_images()
    assert len(examples) >= 3 and all(Path(path).parent == REPO / "app" / "examples" for path in examples)
    assert page.get_by_text("Examples (SynthRoad scenes)").count() >= 1
