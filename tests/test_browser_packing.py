"""Browser: the Runs tab's workers panel shows one packing worker running two runs at
once, with its concurrency and the memory reserved (workers/packing.py)."""

from __future__ import annotations

import re
import shutil
import time

import pytest

from browser_helpers import CHROMIUM, browser, open_tab, studio_page, tiny_config, wait_text  # noqa: F401
from conftest import studio_env, wait_status
from test_worker_packing import client, patient_studio

# two fresh run processes (torch + transformers each) on a shared 2-core machine can take minutes
pytestmark = [pytest.mark.browser, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The studio with its embedded worker packing up to 4 runs in 3 GiB."""
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (make system-deps)")
    tmp = tmp_path_factory.mktemp("browser-packing")
    s = patient_studio(studio_env(tmp, STUDIO_WORKER_CONCURRENCY=4, STUDIO_WORKER_MEMORY_GB=3,
                                  STUDIO_HEARTBEAT_TIMEOUT=90), tmp)
    yield s
    s.stop()


@pytest.fixture
def page(browser, served):  # noqa: F811
    """As browser_helpers.page, with room for a loaded machine (the studio renders slowly)."""
    with studio_page(browser, served.url, timeout_ms=120_000, first_render_ms=300_000) as pg:
        yield pg


def test_the_workers_panel_shows_two_runs_of_one_worker_at_once(served, page):
    with client(served) as c:
        ids = []
        for name in ("packed-a", "packed-b"):
            cfg = tiny_config(name, steps=3000)
            cfg["training"]["eval_every"] = 0
            r = c.post("/api/runs", json=cfg)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 600
        while not any(sorted(w["running"]) == ids for w in c.get("/api/workers").json()):
            assert time.monotonic() < deadline, served.logs()
            time.sleep(1)
        open_tab(page, "Runs")
        a, b = ids
        text = wait_text(page, "#workers", rf"#{a}, #{b}", timeout_s=180)
        row = next(line for line in text.splitlines() if f"#{a}, #{b}" in line)
        assert re.search(r"\b4\b", row) and re.search(r"\d\.\d\d / 3\.00 GiB", row), row
        for rid in ids:
            c.post(f"/api/runs/{rid}/cancel")
        assert all(wait_status(c, rid, timeout=300)["status"] == "cancelled" for rid in ids)
