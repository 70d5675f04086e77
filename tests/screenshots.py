"""Screenshots of every studio tab for the README: `make screenshots`
(`python -m tests.screenshots docs/screenshots`). Serves the studio on the
embedded default in a temporary data dir, trains a few tiny runs, and drives
Debian's Chromium headless through Launch, Runs, Compare and Playground."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from conftest import Studio, studio_env, wait_status  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def demo_config(name: str, method: dict, steps: int = 24) -> dict:
    return {"name": name, "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 400},
            "method": method,
            "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 1e-2, "max_seq_len": 32,
                         "eval_every": 6, "eval_batches": 2}}


def instruct_config(name: str, method: dict) -> dict:
    """A short SmolLM2 run on demo-instruct whose evaluations decode and score 12 prompts."""
    return {"name": name, "model": "smollm2-135m", "task": "causal_lm",
            "dataset": {"name": "demo-instruct", "max_rows": 240}, "method": method, "metric": "rouge_l",
            "training": {"max_steps": 16, "batch_size": 4, "learning_rate": 2e-3, "max_seq_len": 96,
                         "eval_every": 4, "eval_max_rows": 24, "eval_generate": 12, "eval_generate_tokens": 32}}


INSTRUCT_RUNS = [
    instruct_config("smol-lora-r8", {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    instruct_config("smol-ia3", {"name": "ia3"}),
    instruct_config("smol-prefix", {"name": "prefix_tuning", "num_virtual_tokens": 8}),
]

DEMO_RUNS = [
    demo_config("lora-r4", {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}),
    demo_config("lora-r16", {"name": "lora", "r": 16, "alpha": 32, "target_modules": ["query", "value"]}),
    demo_config("ia3", {"name": "ia3"}),
]


def train_demo_runs(studio: Studio, configs: list[dict] = DEMO_RUNS) -> list[int]:
    ids = []
    with studio.client() as c:
        for cfg in configs:
            r = c.post("/api/runs", json=cfg)
            r.raise_for_status()
            ids.append(r.json()["id"])
        for rid in ids:
            run = wait_status(c, rid, timeout=900)
            if run["status"] != "succeeded":
                raise RuntimeError(f"demo run {rid} {run['status']}: {run.get('error')}\n{studio.logs()}")
    return ids


def choose_runs(page, ids: list[int]) -> None:
    """Pick runs in the Playground's multiselect by typing each one's "#id " label prefix
    (clicking options of a list that re-renders after each pick is flaky)."""
    box = page.locator("#pg-run input")
    for rid in ids:
        box.click()
        box.fill(f"#{rid} ")
        page.get_by_role("option", name=re.compile(rf"^#{rid} ")).first.wait_for()
        box.press("Enter")
        time.sleep(0.5)
    page.keyboard.press("Escape")


def shoot(url: str, out: Path, ids: list[int], lm_ids: list[int]) -> list[Path]:
    from playwright.sync_api import sync_playwright

    paths = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        page.wait_for_selector("#estimate-plot .js-plotly-plot")
        time.sleep(1.5)

        def save(name: str) -> None:
            time.sleep(1.0)
            path = out / f"{name}.png"
            page.screenshot(path=str(path), full_page=True)
            paths.append(path)

        page.locator("#preview-config").click()
        page.wait_for_selector("#config-yaml .cm-content")
        save("launch")

        page.get_by_role("tab", name="Runs").click()
        page.locator("#runs-table [role=gridcell]").filter(has_text=re.compile(r"^\s*lora-r16\s*$")).first.click()
        page.wait_for_function("() => document.querySelector('#run-status').innerText.includes('lora-r16')")
        page.wait_for_selector("#loss-plot .js-plotly-plot")
        save("runs")

        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-refresh").click()
        for rid in ids:
            page.locator("#compare-runs input").click()
            page.get_by_role("option", name=re.compile(rf"^#{rid} ")).first.click()
        page.keyboard.press("Escape")
        page.wait_for_function(f"() => document.querySelector('#compare-msg').innerText.includes('Comparing {len(ids)}')")
        page.wait_for_selector("#similarity-plot .js-plotly-plot")
        save("compare")

        page.get_by_role("tab", name="Playground").click()
        page.locator("#pg-refresh").click()
        page.locator("#pg-run input").click()
        page.get_by_role("option", name=re.compile(rf"^#{ids[1]} ")).first.click()
        page.locator("#pg-text").get_by_role("textbox").fill("a wonderful, moving film with a great cast")
        page.locator("#pg-go").click()
        page.wait_for_function("() => document.querySelector('#pg-msg').innerText.includes('classification')")
        save("playground")

        # the generation metrics of a causal-LM run: curves and decoded samples
        page.get_by_role("tab", name="Runs").click()
        page.locator("#runs-table [role=gridcell]").filter(has_text=re.compile(r"^\s*smol-lora-r8\s*$")).first.click()
        page.wait_for_function("() => document.querySelector('#run-status').innerText.includes('smol-lora-r8')")
        page.wait_for_selector("#gen-plot .js-plotly-plot")
        page.wait_for_function("() => document.querySelector('#gen-samples').innerText.includes('France') || "
                               "document.querySelector('#gen-samples').querySelectorAll('td').length > 3")
        page.locator("#gen-plot").scroll_into_view_if_needed()
        time.sleep(1.0)
        path = out / "generation-metrics.png"
        page.screenshot(path=str(path), full_page=False)
        paths.append(path)

        # several adapters beside their base, on one loaded SmolLM2 (a fresh page: the one above
        # still has a classification run chosen in the Playground)
        page.close()
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        page.wait_for_selector("#estimate-plot .js-plotly-plot")
        page.get_by_role("tab", name="Playground").click()
        page.locator("#pg-refresh").click()
        choose_runs(page, lm_ids)
        page.locator("#pg-text").get_by_role("textbox").fill("What is the capital of France?")
        page.locator("#pg-go").click()
        page.wait_for_function("() => { const t = document.querySelector('#pg-msg').innerText; "
                               "return /base \\+ 3 runs/.test(t) && !t.includes('generating'); }", timeout=600_000)
        page.locator("#pg-msg").scroll_into_view_if_needed()
        time.sleep(1.0)
        path = out / "playground-multi.png"
        page.screenshot(path=str(path), full_page=False)
        paths.append(path)
        browser.close()
    return paths


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/screenshots")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peft-studio-shots-") as tmp:
        studio = Studio(studio_env(Path(tmp)), Path(tmp))
        try:
            ids = train_demo_runs(studio)
            lm_ids = train_demo_runs(studio, INSTRUCT_RUNS)
            for p in shoot(studio.url, out, ids, lm_ids):
                print(p)
        finally:
            studio.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
