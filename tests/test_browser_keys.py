"""The "API keys" accordion in real Chromium against `peft-studio serve` with login on: a
user logs in, creates a key (shown once), the official `openai` client calls the studio's
/v1 with it, and after the user revokes it in the page the same call is refused (401)."""

from __future__ import annotations

import shutil

import pytest

from browser_helpers import CHROMIUM, browser, wait_text  # noqa: F401  (browser: a fixture)
from conftest import Studio, require, studio_env

openai = require("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium chromium-driver (make system-deps)")
    tmp = tmp_path_factory.mktemp("browser-keys")
    s = Studio(studio_env(tmp, STUDIO_USERS="alice:wonderland"), tmp)
    yield s
    s.stop()


def test_a_key_made_in_the_page_opens_v1_until_revoked_there(served, browser):  # noqa: F811
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = ctx.new_page()
        page.set_default_timeout(60_000)
        page.goto(served.url + "/", timeout=120_000)
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("wonderland")
        page.get_by_role("button", name="Login").click()
        # the page's load events (the keys list among them) have answered once the first estimate is drawn
        page.wait_for_selector("#estimate-plot .js-plotly-plot", timeout=180_000)
        page.locator("#keys-accordion").get_by_text("API keys").first.click()
        page.locator("#keys-name textarea, #keys-name input").first.fill("notebook")
        page.locator("#keys-create").click()
        box = page.locator("#keys-new textarea, #keys-new input").first
        box.wait_for(state="visible")
        page.wait_for_function("(el) => el.value.startsWith('pst-')", arg=box.element_handle())
        key = box.input_value()
        table = page.locator("#keys-table")
        shown = wait_text(page, "#keys-table", "notebook")
        assert key not in shown and key[:12] in shown         # the list shows only its start

        client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        assert "smollm2-135m" in {m.id for m in client.models.list()}

        key_id = table.locator("[role=gridcell]").first.inner_text().strip()
        page.locator("#keys-revoke-id input").fill(key_id)
        page.locator("#keys-revoke").click()
        wait_text(page, "#keys-msg", "revoked")
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    finally:
        ctx.close()
