"""The web page in a real browser: Debian's headless Chromium, driven by Playwright's Python API, loads the page
from a real `nucleus serve` process, submits a prompt, follows the progress bar to the end and finds the images
with their settings, commands and history. A screenshot is written to out/test-artifacts/serve_page.png."""

import os
import shutil
from pathlib import Path

import pytest
from generation_fixtures import tiny_own_pipeline
from serve_helpers import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No first-run work, no background traffic: the test machines have no internet and nothing may download.
CHROMIUM_ARGS = [
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
if os.geteuid() == 0:
    # Chromium refuses to start as root with its sandbox on ("Running as root without --no-sandbox is not
    # supported"): the sandbox drops privileges through user namespaces, which root cannot meaningfully enter.
    # CI runs as root in a throwaway machine and the browser only loads this test's own page on 127.0.0.1.
    CHROMIUM_ARGS.append("--no-sandbox")
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"

pytest.importorskip("fastapi", reason="the serve extra (FastAPI, uvicorn) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's package (apt-get install -y chromium), as .ci/run does",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tmp_path_factory.mktemp("browser") / "tiny-model"
    tiny_own_pipeline().save_pretrained(model)
    with running_server(model, "--max-batch", "4", "--default-steps", "30") as (base, _):
        yield base


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(120_000)
        page.goto(server + "/")
        yield page
        browser.close()


def test_page_generates_images_with_progress_settings_and_history(page):
    page.wait_for_selector("#model.ok")
    assert page.locator("#aspect option").count() == 7 and page.input_value("#steps") == "30"
    page.fill("#prompt", "a red circle left of a blue square")
    page.fill("#negative", "blurry")
    page.select_option("#aspect", "4:3")
    page.select_option("#n", "2")
    page.fill("#seed", "42")
    # Record every state and fill level the progress bar goes through, however fast the generation is.
    page.evaluate("""() => { window.progressSeen = [];
        new MutationObserver(() => { const p = document.getElementById('progress');
            window.progressSeen.push([p.dataset.state, Number(p.getAttribute('aria-valuenow'))]); })
        .observe(document.getElementById('progress'), {attributes: true}); }""")
    page.click("#generate")
    page.wait_for_selector('#progress[data-state="done"]')
    seen = page.evaluate("window.progressSeen")
    assert ["running", 0] in seen and seen[-1] == ["done", 100], seen
    assert [value for _, value in seen] == sorted(value for _, value in seen)  # the bar only moves forward
    assert page.locator("#error").is_hidden()

    cards = page.locator(".result")
    assert cards.count() == 2
    page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth)")
    sizes = page.eval_on_selector_all(".result img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[36, 28], [36, 28]]
    assert page.locator(".result .seed").all_inner_texts() == ["42", "43"]
    commands = page.locator(".result .command").all_inner_texts()
    assert all(c.startswith("nucleus generate") and "--negative blurry" in c for c in commands)
    assert "--seed 42" in commands[0] and "--seed 43" in commands[1] and "--width 36 --height 28" in commands[0]
    assert "36×28 · 30 steps" in cards.first.inner_text()

    page.locator(".result .copy").first.click()
    page.wait_for_function("document.querySelector('.result .copy').textContent === 'copied'")

    # A second prompt: new results replace the grid, the session history keeps all three images.
    page.fill("#prompt", "a green triangle")
    page.select_option("#n", "1")
    page.fill("#seed", "")
    page.click("#generate")
    page.wait_for_function("document.querySelector('.result .prompt')?.textContent === 'a green triangle'")
    page.wait_for_function("document.querySelectorAll('#history img').length === 3")
    page.locator("#history img").last.click()  # the oldest image: its settings go back into the form
    assert page.input_value("#prompt") == "a red circle left of a blue square" and page.input_value("#seed") == "42"

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000


def test_page_shows_the_servers_refusal(page):
    page.evaluate("document.getElementById('prompt').removeAttribute('maxlength')")
    page.fill("#prompt", "x" * 1001)
    page.click("#generate")
    page.wait_for_selector('#progress[data-state="failed"]')
    assert "1001 characters; at most 1000" in page.inner_text("#error")
