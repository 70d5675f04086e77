"""The studio in a real browser: Playwright driving Debian's Chromium (headless)
against `peft-studio serve` on the embedded default (SQLite + filesystem broker
+ its own worker). Every wait is bounded; the studio and browser are stopped
afterwards."""

from __future__ import annotations

import io
import re
import time
import zipfile

import pytest

from conftest import Studio, studio_env

from browser_helpers import (UI_TIMEOUT_MS, browser, finished_run, open_tab, page, select_run_row,  # noqa: F401
                             served, shown_probabilities, text_of, wait_text)

pytestmark = pytest.mark.browser

# ------------------------------------------------------------------ tests

def test_launch_lora_from_the_form_and_watch_it_succeed(page, served):
    """A newcomer's first click: the default form (MiniLM, demo-sentiment, LoRA), shortened."""
    assert page.locator("#model input").input_value() == "minilm"
    assert page.locator("#method input").input_value() == "lora"
    assert page.locator("#ds-name input").input_value() == "demo-sentiment"
    page.locator("#run-name").get_by_role("textbox").fill("form-lora")
    page.locator("#max-rows input").fill("160")
    page.locator("#max-steps input").fill("8")
    page.locator("#eval-every input").fill("4")
    page.locator("#seq input").fill("32")
    page.locator("#launch").click()
    msg = wait_text(page, "#launch-msg", r"Run \d+ queued")
    rid = int(re.search(r"Run (\d+) queued", msg).group(1))
    open_tab(page, "Runs")
    row = page.locator("#runs-table [role=row]", has_text="form-lora").first
    deadline = time.monotonic() + 180
    while "succeeded" not in row.inner_text():
        assert "failed" not in row.inner_text(), served.logs()
        assert time.monotonic() < deadline, f"run {rid} did not succeed in the table: {row.inner_text()}"
        time.sleep(1)
    assert "minilm" in row.inner_text() and "lora" in row.inner_text()
    # the selected run (the one just launched) shows its curves and config
    wait_text(page, "#run-status", rf"Run {rid} · form-lora — succeeded")
    assert page.locator("#loss-plot .js-plotly-plot").count() == 1
    assert "r: 8" in text_of(page, "#run-config")
    with served.client() as c:
        assert c.get(f"/api/runs/{rid}").json()["config"]["training"]["max_steps"] == 8


def test_changing_the_rank_changes_the_estimate(page):
    # a CPU-only studio starts on its CPU; this test is about a GPU's fit
    wait_text(page, "#estimate-text", r"estimated for the CPU")
    page.locator("#gpu input").click()
    page.get_by_role("option", name=re.compile(r"^24 GB")).first.click()
    before = wait_text(page, "#estimate-text", r"estimated for a CUDA GPU[\s\S]*Trainable: [\d,]+ of")
    assert "Trainable: 74,498 of 22,787,714" in before           # MiniLM, LoRA r=8 on query,value (as trained)
    rank = page.locator("#rank input[type=number]")
    rank.fill("32")
    rank.press("Enter")
    after = wait_text(page, "#estimate-text", r"Trainable: 295,682 of")
    assert after != before and "fits on 24 GB" in after and "largest batch per device that fits" in after
    assert "fewest devices that fit: 1 (ddp)" in after
    devices = page.locator("#devices input[type=number]")
    devices.fill("4")
    devices.press("Enter")
    page.locator("#strategy").get_by_text("fsdp", exact=True).click()
    four = wait_text(page, "#estimate-text", r"per device, 4 × fsdp")
    assert "fits on 4 × 24 GB" in four
    page.locator("#formula").get_by_text("slide").click()
    wait_text(page, "#estimate-text", r"slide formula")


def test_a_target_module_typo_shows_its_error(page, served):
    with served.client() as c:
        before = len(c.get("/api/runs").json())
    page.locator("#targets").get_by_role("textbox").fill("query,valeu")
    page.locator("#launch").click()
    msg = wait_text(page, "#launch-msg", r"method\.target_modules")
    assert "'valeu'" in msg and msg.startswith("✗")
    with served.client() as c:
        assert len(c.get("/api/runs").json()) == before          # nothing queued


def test_compare_two_runs_shows_both_curves(page, served):
    a, b = finished_run(served, "cmp-r4", 4), finished_run(served, "cmp-r8", 8)
    open_tab(page, "Compare")
    page.locator("#compare-refresh").click()
    for label in (f"#{a} cmp-r4", f"#{b} cmp-r8"):
        page.locator("#compare-runs input").click()
        page.get_by_role("option", name=re.compile(re.escape(label))).first.click()
    wait_text(page, "#compare-msg", r"Comparing 2 runs")
    names = page.evaluate("() => document.querySelector('#compare-loss .js-plotly-plot').data.map(t => t.name)")
    assert names == [f"#{a} cmp-r4", f"#{b} cmp-r8"]
    points = page.evaluate("() => document.querySelector('#compare-loss .js-plotly-plot').data.map(t => t.x.length)")
    assert points == [8, 8]
    assert "cmp-r8" in text_of(page, "#compare-table") and "method.r" in text_of(page, "#compare-config")
    page.wait_for_selector("#similarity-plot .js-plotly-plot")   # two LoRA runs: the subspace heatmap
    with page.expect_download() as dl:
        page.locator("#compare-csv").click()
    csv_text = open(dl.value.path()).read()
    assert csv_text.startswith("id,name,model,method") and "cmp-r4" in csv_text


def test_download_the_adapter_zip(page, served):
    rid = finished_run(served, "dl-lora")
    open_tab(page, "Runs")
    select_run_row(page, "dl-lora")
    wait_text(page, "#run-status", rf"Run {rid} · dl-lora — succeeded")
    button = page.locator("#download-adapter")
    deadline = time.monotonic() + 20
    while button.is_disabled():
        assert time.monotonic() < deadline, "download button stayed disabled"
        time.sleep(0.3)
    with page.expect_download() as dl:
        button.click()
    assert dl.value.suggested_filename.endswith(".zip")
    z = zipfile.ZipFile(io.BytesIO(open(dl.value.path(), "rb").read()))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "run_config.yaml",
            "peft_studio.json", "metrics.jsonl"} <= set(z.namelist())
    assert "PeftModel.from_pretrained" in z.read("README.md").decode()


def test_playground_shows_base_and_adapter_side_by_side(page, served):
    rid = finished_run(served, "pg-lora")
    open_tab(page, "Playground")
    page.locator("#pg-refresh").click()
    page.locator("#pg-run input").click()
    page.get_by_role("option", name=re.compile(rf"#{rid} pg-lora")).first.click()
    page.keyboard.press("Escape")
    page.locator("#pg-text").get_by_role("textbox").fill("a wonderful, moving film")
    page.locator("#pg-go").click()
    wait_text(page, "#pg-msg", r"classification · base \+ 1 run on tiny-bert", timeout_s=60)
    with served.client() as c:
        r = c.post("/api/generate", json={"run_ids": [rid], "prompt": "a wonderful, moving film"})
    assert r.status_code == 200, r.text
    base, run = (o["probabilities"] for o in r.json()["outputs"])
    assert run != pytest.approx(base, abs=1e-5)          # the adapter moves them: the columns can be told apart
    for i, want in enumerate((base, run)):
        wait_text(page, f"#pg-probs-{i}", r"(positive|negative)")
        assert shown_probabilities(page, i) == pytest.approx(want, abs=1e-6), i


@pytest.mark.postgres
@pytest.mark.redis
def test_the_ui_on_postgres_and_redis_with_a_separate_worker(browser, tmp_path, pg_url, redis_url):
    """The same form-to-succeeded path on the scale-out setup, and the worker list."""
    s = Studio(studio_env(tmp_path, STUDIO_DATABASE_URL=pg_url, STUDIO_BROKER_URL=redis_url), tmp_path)
    try:
        s.start_worker("gpu-box-1@test")
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        page.goto(s.url + "/")
        page.wait_for_selector("#estimate-plot .js-plotly-plot")
        page.locator("#run-name").get_by_role("textbox").fill("pg-redis-form")
        page.locator("#max-steps input").fill("6")
        page.locator("#launch").click()
        rid = int(re.search(r"Run (\d+) queued", wait_text(page, "#launch-msg", r"Run \d+ queued")).group(1))
        open_tab(page, "Runs")
        row = page.locator("#runs-table [role=row]", has_text="pg-redis-form").first
        deadline = time.monotonic() + 180
        while "succeeded" not in row.inner_text():
            assert "failed" not in row.inner_text(), s.logs()
            assert time.monotonic() < deadline, s.logs()
            time.sleep(1)
        wait_text(page, "#workers", r"gpu-box-1@test", timeout_s=40)
        with s.client() as c:
            run = c.get(f"/api/runs/{rid}").json()
            assert run["worker_host"] == "gpu-box-1@test" and run["status"] == "succeeded"
        ctx.close()
    finally:
        s.stop()
