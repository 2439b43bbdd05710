"""`mmcl demo` in a real browser: headless Chromium (Playwright, the system's Chromium) uploads an
emoji, types labels and reads the top label off the page (it must be the label `mmcl.apps.predict`
gives for that image), then searches the folder and counts the grid's images; a screenshot is
saved. Skipped, saying why, when gradio, Playwright or Chromium is not installed."""

import importlib.util
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mmcl.training.loop import train
from tests.conftest import REPO, free_port
from tests.test_train import debug_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
START_BOUND_S = 180  # the server imports gradio and torch, loads the model and embeds the folder
MISSING = next((why for why, gone in [
    ('gradio is not installed: pip install "mmcl[demo]"', importlib.util.find_spec("gradio") is None),
    ("Playwright is not installed: pip install playwright", importlib.util.find_spec("playwright") is None),
    ("no Chromium on this machine: apt-get install -y chromium", CHROMIUM is None)] if gone), None)


def wait_for_page(url, server):
    deadline = time.monotonic() + START_BOUND_S
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[0][-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {START_BOUND_S} s")


@pytest.mark.browser
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_the_demo_classifies_an_uploaded_emoji_and_shows_a_search_grid(tmp_path, emoji_cache, small_emoji):
    from datasets import load_from_disk
    from playwright.sync_api import expect, sync_playwright

    from mmcl.apps.predict import load_for_inference, predict

    train(debug_config(tmp_path / "run", emoji_cache, f"--data.train={small_emoji}", "--data.validation=null", "--data.validation_share=0"))
    model, folder = tmp_path / "run" / "final", tmp_path / "images"
    folder.mkdir()
    rows = load_from_disk(small_emoji).select(range(12))
    for i, row in enumerate(rows):
        row["image"].save(folder / f"{i:02d}.png")
    labels = [rows[i]["name"] for i in (0, 1, 2)]
    upload = folder / "00.png"
    expected = predict(*load_for_inference(str(model)), [upload], labels)[0]["top"][0]["label"]

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mmcl.cli", "demo", str(model), "--images", str(folder),
                               "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        wait_for_page(f"http://127.0.0.1:{port}/", server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("input[type=file]", state="attached")
            page.set_input_files("input[type=file]", str(upload))
            page.get_by_label("labels (comma-separated)").fill(", ".join(labels))
            page.get_by_role("button", name="Classify").click()
            top = page.locator('[data-testid="label-output-value"]')
            top.wait_for()
            assert top.inner_text().strip() == expected
            page.screenshot(path=str(tmp_path / "zero_shot.png"), full_page=True)

            page.get_by_role("tab", name="Search").click()
            page.get_by_label("text").fill(labels[1])
            page.get_by_role("button", name="Search").click()
            expect(page.locator(".thumbnail-item img")).to_have_count(12)  # 12 shown of the folder's 12
            caption = page.locator(".thumbnail-item").first.inner_text().split()
            assert re.fullmatch(r"-?\d\.\d{3}", caption[0]) and caption[1].endswith(".png"), caption  # score, file
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
            browser.close()
    finally:
        server.kill()
        server.communicate(timeout=60)
    assert Path(tmp_path / "search.png").stat().st_size > 10_000


@pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason='gradio is not installed: pip install "mmcl[demo]"')
def test_the_demo_says_why_an_image_cannot_be_read_and_offers_the_templates(tmp_path):
    """The page's classify function on a file that is not an image: gradio shows the gr.Error's text,
    which names the file and the decoder's reason (not a bare "Error")."""
    import gradio as gr

    from mmcl.apps.demo import build_demo
    from tests.conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "model", "red heart cat car tree")
    demo = build_demo(str(model))
    classify = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "classify")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a png")
    with pytest.raises(gr.Error, match=r"broken.png: cannot read this image \(\w+Error: .+\)"):
        classify(str(broken), "red heart, cat", "auto")
    good = tmp_path / "good.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(good)
    assert set(classify(str(good), "red heart, cat", "name")) == {"red heart", "cat"}
    dropdown = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown))
    assert [c[0] for c in dropdown.choices] == ["auto", "name", "simple", "ensemble"]
