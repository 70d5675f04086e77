"""The Studies tab in a real browser (Playwright driving Debian's Chromium against
`peft-studio serve` on the embedded default): a study started over REST is followed to
its end (each method's best run, the metric-vs-learning-rate, pruning, Pareto and
importance plots), "Compare the winners" opens Compare with one best run per method, and
a study started from the form is cancelled from the tab (its trials' runs cancelled)."""

from __future__ import annotations

import re

import pytest

from browser_helpers import browser, open_tab, served, studio_page, wait_text  # noqa: F401
from test_studies_served import tiny_study, wait_study

pytestmark = pytest.mark.browser
PAGE_TIMEOUT_MS = 120_000


def test_a_study_is_followed_compared_and_cancelled_in_the_tab(browser, served):
    with served.client() as c:
        sid = c.post("/api/studies", json=tiny_study(name="in-browser")).json()["id"]
        st = wait_study(c, sid)
    assert st["status"] == "completed", served.logs()
    with studio_page(browser, served.url, timeout_ms=PAGE_TIMEOUT_MS) as page:
        open_tab(page, "Studies")
        page.locator("#study-refresh").click()
        wait_text(page, "#study-status", rf"Study #{sid} in-browser: completed", 60)
        best = wait_text(page, "#study-best", r"bitfit", 30)
        assert "lora" in best
        for plot in ("#study-lr", "#study-pruning", "#study-pareto-params", "#study-pareto-memory"):
            page.wait_for_selector(f"{plot} .js-plotly-plot")
        trials = page.locator("#study-trials").inner_text()
        assert len(re.findall(r"completed|pruned", trials)) >= 4

        page.locator("#study-compare").click()
        wait_text(page, "#compare-msg", r"Comparing 2 runs", 90)
        shown = page.locator("#compare-runs").inner_text()
        for m in ("lora", "bitfit"):
            assert f"#{st['best'][m]['run_id']} " in shown

        # a study from the form, cancelled from the tab
        open_tab(page, "Studies")
        page.locator("#study-name textarea, #study-name input").first.fill("from-form")
        model = page.locator("#study-model input")
        model.fill("tiny-bert")
        model.press("Enter")
        page.locator("#study-budget input").fill("8")
        page.locator("#study-steps input").fill("40")
        page.locator("#study-seq input").fill("24")
        page.locator("#study-create").click()
        msg = wait_text(page, "#study-create-msg", r"Study #\d+ started", 90)
        new_id = int(re.search(r"#(\d+)", msg).group(1))
        wait_text(page, "#study-status", rf"Study #{new_id} from-form: running", 60)
        page.locator("#study-cancel").click()
        wait_text(page, "#study-create-msg", rf"Study #{new_id} cancelled", 60)
    with served.client() as c:
        st2 = c.get(f"/api/studies/{new_id}").json()
        assert st2["status"] == "cancelled"
        assert st2["spec"]["base"]["model"] == "tiny-bert" and st2["budget"] == {"trials": 8}
        assert st2["trials"] and all(t["state"] in ("cancelled", "completed", "pruned") for t in st2["trials"])
        for t in st2["trials"]:
            if t["state"] == "cancelled":
                run = c.get(f"/api/runs/{t['run_id']}").json()
                assert run["status"] == "cancelled" or run["cancel_requested"]
