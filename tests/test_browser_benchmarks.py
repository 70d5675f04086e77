"""The Benchmarks tab in Chromium against a served studio: a user picks a finished run,
pastes a task of their own (harness YAML over a file they uploaded), evaluates the run and
its base model; the table then shows the base model first and the run below it, each with
its score ± stderr, the jobs listed as succeeded; and a task that could run code is refused
on the page with the reason."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import yaml

import conftest
from browser_helpers import CHROMIUM, browser, open_tab, studio_page, wait_text  # noqa: F401
from conftest import Studio, studio_env, wait_status

pytestmark = pytest.mark.browser
FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
RUN = {"name": "bench-llama-lora", "model": "tiny-llama", "task": "causal_lm",
       "dataset": {"name": "demo-instruct", "max_rows": 40},
       "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
       "training": {"max_steps": 4, "batch_size": 4, "learning_rate": 2e-2, "max_seq_len": 48,
                    "eval_every": 0, "eval_batches": 1, "eval_generate": 0}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """browser_helpers' studio with the longer waits a shared machine needs (its start, the
    heartbeats of a busy worker: see test_browser_playground)."""
    import shutil

    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (make system-deps)")
    tmp = tmp_path_factory.mktemp("browser-benchmarks")
    wait = conftest.wait_http
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conftest, "wait_http", lambda url, timeout=400, proc=None: wait(url, 400, proc))
        s = Studio(studio_env(tmp, STUDIO_HEARTBEAT_TIMEOUT=120), tmp)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def prepared(served):
    """A finished tiny-llama run and the multiple-choice file uploaded; the task YAML over it."""
    with httpx.Client(base_url=served.url, timeout=300) as c:
        resp = c.post("/api/runs", json=RUN)
        assert resp.status_code == 201, resp.text
        rid = resp.json()["id"]
        assert wait_status(c, rid, timeout=400)["status"] == "succeeded", served.logs()
        up = c.post("/api/datasets", files={"file": ("mc.jsonl", (FIXTURES / "mc.jsonl").read_bytes(),
                                                     "application/json")})
        assert up.status_code == 201, up.text
    cfg = yaml.safe_load((FIXTURES / "user_mc.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"] = up.json()["path"]
    return rid, yaml.safe_dump(cfg, sort_keys=False)


def choose_run(page, rid: int) -> None:
    open_tab(page, "Benchmarks")
    page.locator("#bench-refresh").click()
    page.locator("#bench-runs input").click()
    page.get_by_role("option", name=re.compile(rf"^#{rid} ")).first.click()
    page.keyboard.press("Escape")


def type_task(page, text: str) -> None:
    editor = page.locator("#bench-user-task .cm-content")
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    editor.fill(text)


def test_evaluate_a_run_and_its_base_and_read_the_table(browser, served, prepared):
    rid, task = prepared
    with studio_page(browser, served.url, first_render_ms=240_000) as page:
        choose_run(page, rid)
        type_task(page, task.replace("task: user_mc", "task: user_mc\nprocess_docs: utils.evil"))
        page.locator("#bench-evaluate").click()
        wait_text(page, "#bench-msg", r"Refused.*user_tasks\[0\]\.process_docs: not allowed")

        type_task(page, task)
        page.locator("#bench-evaluate-base").click()
        wait_text(page, "#bench-msg", r"Queued benchmark job \d+ \(base tiny-llama\)")
        page.locator("#bench-evaluate").click()
        wait_text(page, "#bench-msg", r"Queued benchmark job\(s\) \d+\.")

        deadline = time.monotonic() + 300
        while True:
            page.locator("#bench-refresh").click()
            time.sleep(2)
            jobs = page.locator("#bench-jobs").inner_text()
            if jobs.count("succeeded") >= 2 or "failed" in jobs or time.monotonic() > deadline:
                break
        assert jobs.count("succeeded") == 2, (jobs, served.logs())
        text = page.locator("#bench-table").inner_text()
        assert "user_mc (acc)" in text, text
        base_at, run_at = text.find("base (tiny-llama)"), text.find(f"#{rid} bench-llama-lora")
        assert 0 <= base_at < run_at, text                       # the base model is the first row
        assert len(re.findall(r"\d\.\d{4} ± \d\.\d{4}", text)) == 2, text      # a score ± stderr in each
