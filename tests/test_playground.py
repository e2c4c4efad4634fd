"""The playground page in a real headless browser (the system's chromium driven by Playwright): it streams
the text the API gives, shades every token by its probability and shows the alternatives on hover.

CI needs Debian's `chromium` package (and `fonts-dejavu-core` for legible screenshots); Playwright's own
browser download is not used. The screenshot goes to the test's temporary directory; with
GPT2ONNX_UPDATE_DOCS=1 it also replaces docs/playground.png (the README's picture)."""

import os
import shutil
from pathlib import Path

import pytest

import gpt2onnx
from gpt2onnx.generation.engine import Engine, EngineOptions
from gpt2onnx.serving.server import ServerOptions, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "playground.png"
PROMPT = "To search for a pattern, type"
KEY = "playground-key"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_playground_streams_shaded_tokens_with_alternatives(browser, trained_export, tmp_path):
    from test_server import LiveServer

    model = gpt2onnx.load(trained_export)
    with Engine(model, EngineOptions(max_batch=4)) as engine, \
            LiveServer(create_app(engine, ServerOptions(model_name="gpt2-tiny-trained", api_keys=(KEY,)))) as live:
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(live.url + "/")
        page.wait_for_function("document.getElementById('status-text').textContent.includes('API key')")
        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('status').classList.contains('ok')")
        page.fill("#prompt", PROMPT)
        page.fill("#seed", "7")
        page.eval_on_selector("#max_tokens", "el => { el.value = 48; el.dispatchEvent(new Event('input')); }")
        page.click("#generate")
        page.wait_for_function("document.getElementById('stats').textContent.includes('finish')", timeout=60_000)

        tokens = page.locator("#output .tok")
        assert tokens.count() >= 10
        shaded = page.eval_on_selector_all("#output .tok", "spans => spans.filter(s => s.style.background).length")
        assert shaded >= tokens.count() - 1  # the last may be an end marker without a probability
        text = page.eval_on_selector_all("#output .tok:not(.end)", "spans => spans.map(s => s.textContent).join('')")
        expected = model.generate(PROMPT, max_new_tokens=48, seed=7, do_sample=True, temperature=0.8, top_p=0.95,
                                  top_k=40, allow_special_tokens=True).text
        assert text == expected  # the page shows what the API streams, which is the library's text

        # hover the least likely token that has a visible box (not a bare newline): an interesting one
        probabilities = page.eval_on_selector_all(
            "#output .tok", "spans => spans.map(s => s.dataset.p && s.textContent.trim() ? +s.dataset.p : 2)")
        tokens.nth(min(range(len(probabilities)), key=probabilities.__getitem__)).hover()
        tooltip = page.locator("#tooltip")
        tooltip.wait_for(state="visible")
        assert tooltip.locator("tr").count() >= 5  # the 5 likeliest (plus the chosen token when it is not one)
        assert tooltip.locator("tr.chosen").count() == 1
        assert "%" in tooltip.inner_text()
        page.screenshot(path=str(tmp_path / "playground.png"))
        if os.environ.get("GPT2ONNX_UPDATE_DOCS") == "1":
            shutil.copyfile(tmp_path / "playground.png", SCREENSHOT)
        assert not errors, errors
