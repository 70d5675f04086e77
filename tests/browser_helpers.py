"""Shared pieces of the browser tests: Playwright driving Debian's Chromium
(headless) against `peft-studio serve` on the embedded default. A test module
imports the fixtures it uses by name (`from browser_helpers import served, browser,
page`): each module gets its own studio (starting one takes ~30 s)."""

from __future__ import annotations

import contextlib
import re
import shutil
import time

import pytest

from conftest import Studio, studio_env, wait_status

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
UI_TIMEOUT_MS = 30_000


def tiny_config(name: str, r: int = 4, steps: int = 8) -> dict:
    return {"name": name, "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 160},
            "method": {"name": "lora", "r": r, "alpha": 2 * r, "target_modules": ["query", "value"]},
            "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-2, "max_seq_len": 32,
                         "eval_every": 4, "eval_batches": 1}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One studio on the embedded default for this module (starting one takes ~30 s)."""
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (make system-deps)")
    tmp = tmp_path_factory.mktemp("browser")
    s = Studio(studio_env(tmp), tmp)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@contextlib.contextmanager
def studio_page(browser, url: str, timeout_ms: int = UI_TIMEOUT_MS, first_render_ms: int = UI_TIMEOUT_MS):
    """A fresh browser context on the studio at `url`, once the Launch tab's first estimate
    has drawn (up to `first_render_ms`: on a busy machine that can take minutes), with
    `timeout_ms` as every later wait's default."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    try:
        pg = ctx.new_page()
        pg.set_default_timeout(timeout_ms)
        pg.goto(url + "/", timeout=first_render_ms)
        pg.wait_for_selector("#estimate-plot .js-plotly-plot", timeout=first_render_ms)
        yield pg
    finally:
        ctx.close()


@pytest.fixture
def page(browser, served):
    with studio_page(browser, served.url) as pg:
        yield pg


def finished_run(served, name: str, r: int = 4) -> int:
    with served.client() as c:
        resp = c.post("/api/runs", json=tiny_config(name, r))
        assert resp.status_code == 201, resp.text
        rid = resp.json()["id"]
        run = wait_status(c, rid, timeout=180)
    assert run["status"] == "succeeded", served.logs()
    return rid


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_text(page, selector: str, pattern: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = page.locator(selector).inner_text()
        if re.search(pattern, text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"{selector}: {pattern!r} not seen within {timeout_s} s; last text: {text!r}")


def shown_probabilities(page, column: int) -> dict[str, float]:
    """The Playground column's label -> probability as its bars hold them: each bar is a
    <meter> whose value is the probability itself (the percentages beside it are rounded)."""
    return dict(page.evaluate("(sel) => Array.from(document.querySelectorAll(sel + ' meter'))"
                              ".map(m => [m.getAttribute('aria-label'), m.value])", f"#pg-probs-{column}"))


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def select_run_row(page, name: str) -> None:
    cell = page.locator("#runs-table [role=gridcell]").filter(has_text=re.compile(rf"^\s*{re.escape(name)}\s*$"))
    cell.first.click()


