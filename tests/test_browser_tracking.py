"""The Launch form's tracking and metric controls in a real browser (Playwright driving
Debian's Chromium against `peft-studio serve` on the embedded default): the metric
dropdown and the generation count follow the task, a bad tracker value shows the
config error and queues nothing, and a run launched with TensorBoard on and a metric
carries both in its stored config (read back through the REST API) and writes its
event files where the run's `tracking` says."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import wait_status

import conftest
from browser_helpers import CHROMIUM, browser, studio_page, wait_text  # noqa: F401

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """browser_helpers' studio, allowed 300 s (not 90) to answer: on a 2-core machine
    running other suites it can take longer to start; stopped afterwards even if it
    never answered."""
    import shutil

    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (make system-deps)")
    tmp = tmp_path_factory.mktemp("browser")
    started = []
    real_popen = conftest.subprocess.Popen

    def popen(*a, **kw):
        p = real_popen(*a, **kw)
        started.append(p)
        return p

    wait = conftest.wait_http
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conftest, "wait_http", lambda url, timeout=90.0, proc=None: wait(url, 300.0, proc))
        mp.setattr(conftest.subprocess, "Popen", popen)
        try:
            s = conftest.Studio(conftest.studio_env(tmp), tmp)
        except BaseException:
            for p in started:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            raise
    yield s
    s.stop()


@pytest.fixture
def page(browser, served):
    """browser_helpers' page, with a longer first wait: the first estimate can take
    over 30 s on a busy 2-core machine."""
    with studio_page(browser, served.url, first_render_ms=180_000) as pg:
        yield pg


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).first.click()


def options_of(page, elem_id: str) -> list[str]:
    page.locator(f"#{elem_id} input").click()
    names = [o.inner_text().replace("✓", "").strip() for o in page.get_by_role("option").all()]
    page.keyboard.press("Escape")
    return names


def wait_options(page, elem_id: str, expected: list[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (got := options_of(page, elem_id)) != expected:
        assert time.monotonic() < deadline, f"#{elem_id} offers {got}, not {expected}"
        time.sleep(0.5)


def test_launch_with_tensorboard_and_a_metric_from_the_form(page, served):
    pick(page, "model", "tiny-bert")
    page.wait_for_function("() => document.querySelector('#task input[value=classification]').checked")
    assert not page.locator("#eval-generate").is_visible()
    wait_options(page, "metric", ["eval_loss", "accuracy"])
    # causal LM: the generation count shows and the metric offers the generation metrics
    page.locator("#task").get_by_text("causal_lm").click()
    page.locator("#eval-generate").wait_for(state="visible")
    wait_options(page, "metric", ["eval_loss", "perplexity", "bleu", "rouge_l", "exact_match"])
    page.locator("#task").get_by_text("classification").click()
    page.locator("#eval-generate").wait_for(state="hidden")
    page.locator("#ds-name input").click()
    page.get_by_role("option", name="demo-sentiment", exact=True).first.click()

    page.locator("#run-name").get_by_role("textbox").fill("form-tracked")
    page.locator("#max-rows input").fill("32")
    page.locator("#max-steps input").fill("2")
    page.locator("#eval-every input").fill("2")
    page.locator("#seq input").fill("16")
    pick(page, "metric", "eval_loss")
    page.locator("#tracking").get_by_text("Tracking").first.click()
    # a URI with credentials is refused by the schema, naming the field; nothing is queued
    with served.client() as c:
        before = len(c.get("/api/runs").json())
    page.locator("#mlflow-uri").get_by_role("textbox").fill("http://me:secret@mlflow.example:5000")
    page.locator("#launch").click()
    msg = wait_text(page, "#launch-msg", r"tracking\.mlflow")
    assert "holds credentials" in msg and "secret" not in msg
    page.locator("#mlflow-uri").get_by_role("textbox").fill("")
    page.locator("#tensorboard input").check()
    page.locator("#launch").click()
    rid = int(re.search(r"Run (\d+) queued", wait_text(page, "#launch-msg", r"Run \d+ queued")).group(1))
    with served.client() as c:
        assert len(c.get("/api/runs").json()) == before + 1
        cfg = c.get(f"/api/runs/{rid}").json()["config"]
        assert cfg["tracking"] == {"tensorboard": True}
        assert cfg["metric"] == "eval_loss" and cfg["model"] == "tiny-bert"
        run = wait_status(c, rid, timeout=300)
    assert run["status"] == "succeeded", served.logs()
    assert run["metric_name"] == "eval_loss"
    logdir = Path(run["tracking"]["tensorboard"]["logdir"])
    assert logdir.name == f"run-{rid}" and list(logdir.glob("events.out.tfevents.*"))
    assert run["warnings"] in (None, [])
