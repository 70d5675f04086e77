"""A newcomer's first hour (#24) in a real browser (Playwright + Debian's Chromium against
`peft-studio serve` on the embedded default, a CPU-only machine): the Launch form's
per-method learning rate and the options that follow the method, named range errors,
catalog models offered for estimating only, the CPU estimate, an upload without a label
column refused by its own name, a run's phase while it runs and no ETA once cancelled, no
resume for a run that failed on its config, and a Playground example the default run gets right."""

from __future__ import annotations

import re
import time

import pytest

from conftest import wait_status
from engine.methods import default_learning_rate

from browser_helpers import browser, open_tab, page, select_run_row, served, text_of, wait_text  # noqa: F401

pytestmark = pytest.mark.browser


def pick(page, dropdown: str, option: str | re.Pattern) -> None:
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option).first.click()


def number(page, elem: str) -> float:
    return float(page.locator(f"{elem} input").input_value())


def wait_value(page, elem: str, want: float, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while abs(number(page, elem) - want) > 1e-12 * max(1.0, want):
        assert time.monotonic() < deadline, f"{elem} shows {number(page, elem)}, not {want}"
        time.sleep(0.2)


def quant_checked(page) -> str:
    return page.locator("#quant input[type=radio]:checked").get_attribute("value") or ""


def runs_count(served) -> int:
    with served.client() as c:
        return len(c.get("/api/runs").json())


def test_the_method_brings_its_learning_rate_and_resets_what_does_not_apply(page):
    wait_value(page, "#lr", default_learning_rate("lora"))
    pick(page, "#method", "qlora")
    wait_value(page, "#lr", default_learning_rate("qlora"))
    deadline = time.monotonic() + 20
    while quant_checked(page) != "nf4":                      # QLoRA quantizes its base
        assert time.monotonic() < deadline, f"Base weights: {quant_checked(page)!r} after picking qlora"
        time.sleep(0.2)
    page.locator("#method-extra").get_by_role("textbox").fill("use_dora: true")
    pick(page, "#method", "ia3")
    wait_value(page, "#lr", default_learning_rate("ia3"))
    deadline = time.monotonic() + 20
    while quant_checked(page) != "none":                     # "Base weights: nf4" does not stay set
        assert time.monotonic() < deadline, f"Base weights: {quant_checked(page)!r} after picking ia3"
        time.sleep(0.2)
    assert page.locator("#method-extra").get_by_role("textbox").input_value() == ""


def test_out_of_range_numbers_name_their_field(page, served):
    before = runs_count(served)
    for elem, value, field in (("#max-steps", "0", "training.max_steps"), ("#batch", "-2", "training.batch_size"),
                               ("#eval-every", "-1", "training.eval_every")):
        page.locator(f"{elem} input").fill(value)
        page.locator("#launch").click()
        msg = wait_text(page, "#launch-msg", re.escape(field))
        assert msg.startswith("✗") and "Value" not in msg.split(":")[0], msg
        page.locator(f"{elem} input").fill("8" if elem != "#eval-every" else "4")
    assert runs_count(served) == before


def test_catalog_models_are_offered_for_estimating_and_refused_at_launch(page, served):
    page.locator("#model input").click()
    names = [n.split("\n")[-1].strip() for n in page.get_by_role("option").all_inner_texts()]   # "✓\nminilm"
    assert "llama-3-8b (estimate only)" in names and "mistral-7b (estimate only)" in names and "minilm" in names
    page.get_by_role("option", name="llama-3-8b (estimate only)").click()
    text = wait_text(page, "#estimate-text", r"llama-3-8b is in the catalog only")
    assert "Total:" in text
    before = runs_count(served)
    page.locator("#launch").click()
    msg = wait_text(page, "#launch-msg", r"catalog only")
    assert "model: 'llama-3-8b'" in msg and msg.startswith("✗")
    assert runs_count(served) == before


def test_a_cpu_only_studio_estimates_for_its_cpu(page):
    text = wait_text(page, "#estimate-text", r"estimated for the CPU")
    assert "no CUDA context" in text and "CUDA context 0.000" in text
    assert page.locator("#gpu input").input_value().startswith("CPU (this machine")
    assert "Trainable: 74,498 of 22,787,714" in text          # the count the worker records


def test_an_upload_without_a_label_column_is_refused_by_its_own_name(page, served, tmp_path):
    csv = tmp_path / "sentences.csv"
    csv.write_text("sentence,score\nnice film,1\nbad film,0\nfine,1\n")
    page.locator("#ds-source").get_by_text("upload", exact=True).click()
    page.locator("#upload input[type=file]").set_input_files(str(csv))
    wait_text(page, "#launch-msg", r"Uploaded sentences\.csv")
    before = runs_count(served)
    for button in ("#preview-config", "#launch"):
        page.locator(button).click()
        msg = wait_text(page, "#launch-msg", r"dataset\.label_column")
        assert "columns in sentences.csv: sentence, score" in msg, msg
        assert not re.search(r"[0-9a-f]{32}", msg), msg           # never the stored key
        # between the two: the bundled dataset previews as valid (the next message must be new)
        page.locator("#ds-source").get_by_text("bundled", exact=True).click()
        page.locator("#preview-config").click()
        wait_text(page, "#launch-msg", r"Config is valid")
        page.locator("#ds-source").get_by_text("upload", exact=True).click()
    assert runs_count(served) == before


def test_a_running_run_shows_its_phase_and_a_cancelled_one_no_eta(page, served):
    body = {"name": "long-phases", "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 160},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "training": {"max_steps": 3000, "batch_size": 4, "max_seq_len": 32, "eval_every": 25,
                         "eval_max_rows": 300}}
    with served.client() as c:
        rid = c.post("/api/runs", json=body).json()["id"]
        wait_status(c, rid, ("running",), timeout=120)
    open_tab(page, "Runs")
    select_run_row(page, "long-phases")
    status = wait_text(page, "#run-status", r"(training: step \d+ / 3000|evaluating: [\d,]+ / 300 rows)", 120)
    wait_text(page, "#run-status", r"ETA \d+[hm]\d\d", 60)
    seen = set()
    with served.client() as c:
        deadline = time.monotonic() + 120
        while not {"training", "evaluating"} <= seen:           # REST says the same, phase by phase
            phase = c.get(f"/api/runs/{rid}").json()["phase"] or ""
            seen.add(phase.split(":")[0])
            assert time.monotonic() < deadline, f"phases seen over REST: {seen}; panel: {status}"
            time.sleep(0.2)
    page.locator("#cancel").click()
    with served.client() as c:
        run = wait_status(c, rid, ("cancelled",), timeout=120)
    assert run["phase"] is None
    ended = wait_text(page, "#run-status", r"— cancelled", 60)
    assert "ETA" not in ended and "training: step" not in ended and "evaluating:" not in ended
    est = run["estimate"]["rows"]["total"] / 2 ** 30                   # the CPU worker's estimate ...
    row = page.locator("#runs-table [role=row]", has_text="long-phases").first.inner_text()
    assert f"{est:.3f}".rstrip("0") in row                              # ... is the table's figure


def test_a_run_that_failed_on_its_config_offers_no_resume(page, served, tmp_path):
    """Text-only data passes the launch check for causal LM, but a generation metric has no
    references to score: the worker fails it on its config, and Resume stays off."""
    csv = tmp_path / "notes.csv"
    csv.write_text("text\n" + "".join(f"note number {i}\n" for i in range(40)))
    with served.client() as c:
        with open(csv, "rb") as f:
            path = c.post("/api/datasets", files={"file": ("notes.csv", f, "text/csv")}).json()["path"]
        body = {"name": "no-refs", "model": "tiny-llama", "task": "causal_lm", "metric": "rouge_l",
                "dataset": {"path": path}, "method": {"name": "lora", "r": 2, "target_modules": ["q_proj"]},
                "training": {"max_steps": 2, "batch_size": 2, "max_seq_len": 16, "eval_generate": 2}}
        resp = c.post("/api/runs", json=body)
        assert resp.status_code == 201, resp.text
        rid = resp.json()["id"]
        run = wait_status(c, rid, timeout=180)
        assert run["status"] == "failed" and "metric: 'rouge_l'" in run["error"] and "notes.csv" in run["error"]
        again = c.post(f"/api/runs/{rid}/resume")
        assert again.status_code in (400, 409, 422) and "failed on its config" in again.text
    open_tab(page, "Runs")
    select_run_row(page, "no-refs")
    wait_text(page, "#run-status", rf"Run {rid} · no-refs — failed")
    deadline = time.monotonic() + 20
    while not page.locator("#resume").is_disabled():
        assert time.monotonic() < deadline, "Resume is offered for a run that failed on its config"
        time.sleep(0.3)


@pytest.mark.slow
def test_the_playground_example_is_one_the_default_run_gets_right(page, served):
    """The Launch form as it first loads (MiniLM, LoRA, its default rate and steps), launched
    as is, learns: accuracy >= 0.75, and the Playground's own example comes out positive."""
    page.locator("#run-name").get_by_role("textbox").fill("first-click")
    page.locator("#launch").click()
    rid = int(re.search(r"Run \*?\*?(\d+)", wait_text(page, "#launch-msg", r"Run \S+ queued")).group(1))
    with served.client() as c:
        run = wait_status(c, rid, timeout=600)
    assert run["status"] == "succeeded", run["error"]
    assert run["best_metric"] >= 0.75 and run["config"]["training"]["learning_rate"] == default_learning_rate("lora")
    open_tab(page, "Playground")
    page.locator("#pg-refresh").click()
    pick(page, "#pg-run", re.compile(rf"#{rid} first-click"))
    page.keyboard.press("Escape")
    box = page.locator("#pg-text").get_by_role("textbox")
    box.fill(box.get_attribute("placeholder"))                 # the example the Playground shows
    page.locator("#pg-go").click()
    wait_text(page, "#pg-probs-1", r"\d+%", timeout_s=120)
    lines = text_of(page, "#pg-probs-1").strip().splitlines()   # run label, top label, then label / % pairs
    probs = {lines[i]: int(lines[i + 1].rstrip("%")) for i in range(2, len(lines) - 1, 2)}
    assert lines[1] == "positive" and probs["positive"] >= 75, lines
