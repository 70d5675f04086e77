"""The Runs and Compare tabs as a lab, in a real browser (Playwright driving Debian's
Chromium against `peft-studio serve` on the embedded default): a tiny-llama causal-LM
run's generation metrics and decoded samples, the loss smoothing slider, the Pareto
frontier listed under Compare's chart, and the GGUF export button (a refusal for a
BERT model, a download for a Llama one). The runs are trained for real by the
studio's embedded worker; all of them are queued once, at the module's start. The
GGUF download is of a tiny random Llama with SmolLM2's byte-level BPE (a local model
directory made as tests/test_gguf_export.py makes it): tiny-llama's WordPiece
tokenizer has no GGUF form."""

from __future__ import annotations

import re
import time

import pytest

from conftest import wait_status
from studio import charts

from test_gguf_export import make_model_dir

from browser_helpers import (browser, open_tab, select_run_row, served, studio_page, text_of,  # noqa: F401
                             tiny_config, wait_text)

pytestmark = pytest.mark.browser
PAGE_TIMEOUT_MS = 120_000     # this module's runs train in the studio's worker while its pages load


@pytest.fixture
def page(browser, served, runs):
    """browser_helpers' page, with a longer wait for the first render (the runs queued by
    `runs` share the machine's cores with the studio that serves it)."""
    with studio_page(browser, served.url, timeout_ms=PAGE_TIMEOUT_MS) as pg:
        yield pg


def llama_config(name: str) -> dict:
    """A tiny-llama causal-LM run that decodes 4 validation prompts at each of its 2 evaluations.
    Its learning rate is high enough that the outputs are text and change between the two
    (at 1e-2 the tiny random model still decodes only its stop token at both)."""
    return {"name": name, "model": "tiny-llama", "task": "causal_lm", "metric": "bleu",
            "dataset": {"name": "demo-instruct", "max_rows": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-2, "max_seq_len": 64,
                         "eval_every": 3, "eval_batches": 1, "eval_generate": 4, "eval_generate_tokens": 8}}


def bert_lm_config(name: str) -> dict:
    """A causal-LM run on the tiny BERT: GGUF export writes decoder families only, so it refuses this."""
    return {"name": name, "model": "tiny-bert", "task": "causal_lm",
            "dataset": {"name": "demo-instruct", "max_rows": 32},
            "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["query", "value"]},
            "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "max_seq_len": 32,
                         "eval_every": 2, "eval_batches": 1, "eval_generate": 0}}


def bpe_llama_config(name: str, model_dir) -> dict:
    return {**bert_lm_config(name), "model": str(model_dir),
            "method": {"name": "lora", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}}


PARETO = {"par-r2": 2, "par-r4": 4, "par-r16": 16}


@pytest.fixture(scope="module")
def runs(served):
    """{name: id} of every run this module uses, queued together and waited for when read."""
    model_dir = make_model_dir(served.tmp / "data" / "local-models" / "tiny-llama-bpe")
    configs = {"gen-llama": llama_config("gen-llama"), "gguf-bert": bert_lm_config("gguf-bert"),
               "gguf-llama": bpe_llama_config("gguf-llama", model_dir),
               **{n: tiny_config(n, r) for n, r in PARETO.items()}}
    ids = {}
    with served.client() as c:
        for name, cfg in configs.items():
            resp = c.post("/api/runs", json=cfg)
            assert resp.status_code == 201, resp.text
            ids[name] = resp.json()["id"]
    return ids


def succeeded(served, rid: int) -> dict:
    with served.client() as c:
        run = wait_status(c, rid, timeout=420)
    assert run["status"] == "succeeded", (run.get("error"), served.logs())
    return run


def metrics_of(served, rid: int) -> list[dict]:
    with served.client() as c:
        return c.get(f"/api/runs/{rid}/metrics").json()


def plot_data(page, elem_id: str):
    return page.evaluate(f"() => {{ const p = document.querySelector('#{elem_id} .js-plotly-plot');"
                         f" return p && p.data ? p.data.map(t => ({{name: t.name, x: Array.from(t.x || []),"
                         f" y: Array.from(t.y || []), meta: t.meta || null}})) : null; }}")


def wait_plot(page, elem_id: str, check, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    data = None
    while time.monotonic() < deadline:
        data = plot_data(page, elem_id)
        if data and check(data):
            return data
        time.sleep(0.3)
    raise AssertionError(f"#{elem_id}: the expected figure did not appear within {timeout_s} s; last: {data}")


def show_run(page, name: str, rid: int) -> None:
    open_tab(page, "Runs")
    select_run_row(page, name)
    wait_text(page, "#run-status", rf"Run {rid} · {re.escape(name)} — succeeded", timeout_s=60)


def test_generation_metrics_curves_and_samples_in_the_runs_tab(page, served, runs):
    rid = runs["gen-llama"]
    run = succeeded(served, rid)
    assert run["metric_name"] == "bleu"
    evals = [m for m in metrics_of(served, rid) if m.get("eval")]
    assert [m["step"] for m in evals] == [3, 6] and all("bleu" in m["eval"] for m in evals), evals
    last = evals[-1]["eval"]
    assert 1 <= len(last["samples"]) <= 8 and last["gen_rows"] == 4
    show_run(page, "gen-llama", rid)
    data = wait_plot(page, "gen-plot", lambda d: any(t["meta"] == "bleu" for t in d))
    bleu = next(t for t in data if t["meta"] == "bleu")
    assert bleu["x"] == [3, 6] and bleu["y"] == pytest.approx([m["eval"]["bleu"] for m in evals])
    assert {t["meta"] for t in data} == {"bleu", "rouge_l", "exact_match"}
    # the run's metric is BLEU: the validation curve follows it
    wait_plot(page, "eval-plot", lambda d: d[0]["y"] == pytest.approx([m["eval"]["bleu"] for m in evals]))
    table = wait_text(page, "#gen-samples", r"prompt")
    assert "reference" in table and "output" in table
    first = last["samples"][0]
    assert first["prompt"].split("\n")[0][:30] in table and first["reference"].split("\n")[0][:30] in table
    # the earlier evaluation's samples through the step selector: a sample whose output differs
    # between the two evaluations; choosing step 3 must show its step-3 text and drop its step-6 text
    early, late = changed_output(evals[0]["eval"], last)
    assert "step 6" in page.locator("#sample-step input").input_value()
    assert late in words(text_of(page, "#gen-samples"))
    page.locator("#sample-step input").click()
    page.get_by_role("option", name="step 3").click()
    wait_text(page, "#gen-samples", r"\s+".join(re.escape(w) for w in early.split()))
    shown = words(text_of(page, "#gen-samples"))
    assert early in shown and late not in shown, (early, late, shown)


def words(text: str) -> str:
    """`text` with every run of whitespace one space (as a table cell renders it)."""
    return " ".join(text.split())


def changed_output(early_ev: dict, late_ev: dict) -> tuple[str, str]:
    """(step-3 text, step-6 text) of the first sample whose output changed between the two
    evaluations, each found nowhere in the other evaluation's samples; fails when none did."""
    def cells(ev):
        return " | ".join(words(str(s[k])) for s in ev["samples"] for k in ("prompt", "reference", "output"))
    for a, b in zip(early_ev["samples"], late_ev["samples"]):
        e, l = words(a["output"])[:40], words(b["output"])[:40]
        if e and l and e not in cells(late_ev) and l not in cells(early_ev):
            return e, l
    raise AssertionError(f"no sample's output changed between the evaluations: {early_ev['samples']}, "
                         f"{late_ev['samples']}")


def test_the_smoothing_slider_changes_the_loss_curve(page, served, runs):
    rid = runs["par-r4"]
    succeeded(served, rid)
    losses = [m["loss"] for m in metrics_of(served, rid) if m.get("loss") is not None]
    assert len(losses) == 8
    show_run(page, "par-r4", rid)
    smoothed = charts.ema_smooth(losses, charts.SMOOTHING_DEFAULT)
    wait_plot(page, "loss-plot", lambda d: d[0]["y"] == pytest.approx(smoothed))
    box = page.locator("#runs-smoothing input[type=number]")
    for weight, expected in ((0, losses), (0.9, charts.ema_smooth(losses, 0.9))):
        box.fill(str(weight))
        box.press("Enter")
        data = wait_plot(page, "loss-plot", lambda d, e=expected: d[0]["y"] == pytest.approx(e))
        assert len(data) == 1 and len(data[0]["x"]) == 8
    assert losses != pytest.approx(charts.ema_smooth(losses, 0.9))      # the two views differ


def test_compare_lists_the_pareto_frontier_runs(page, served, runs):
    ids = {n: runs[n] for n in PARETO}
    got = {n: succeeded(served, rid) for n, rid in ids.items()}
    # the frontier from the runs' own figures: fewer trainable parameters and a higher accuracy
    pts = {n: (r["n_trainable"], r["best_metric"]) for n, r in got.items()}

    def dominated(n):
        x, y = pts[n]
        return any(ox <= x and oy >= y and (ox < x or oy > y) for m, (ox, oy) in pts.items() if m != n)
    expected = {n for n in pts if not dominated(n)}
    assert "par-r2" in expected       # the fewest parameters: nothing is cheaper
    open_tab(page, "Compare")
    page.locator("#compare-refresh").click()
    for n, rid in ids.items():
        page.locator("#compare-runs input").click()
        page.get_by_role("option", name=re.compile(rf"#{rid} {n} ")).first.click()
    wait_text(page, "#compare-msg", r"Comparing 3 runs")
    listed = wait_text(page, "#compare-front-params", r"Pareto frontier")
    assert {n for n in PARETO if re.search(rf"#{ids[n]} {n}\b", listed)} == expected, listed
    assert "higher is better" in listed
    wait_text(page, "#compare-front-memory", r"Pareto frontier")
    frontier = wait_plot(page, "compare-tradeoff", lambda d: any(t["name"] == "Pareto frontier" for t in d))
    line = next(t for t in frontier if t["name"] == "Pareto frontier")
    assert sorted(line["x"]) == sorted(pts[n][0] for n in expected)
    with served.client() as c:
        body = c.get("/api/compare", params={"run_ids": ",".join(str(i) for i in ids.values())}).json()
    assert set(body["pareto"]["params"]) == {ids[n] for n in expected} and body["metric"] == "accuracy"


def test_gguf_export_refuses_bert_and_downloads_llama(page, served, runs):
    bert, llama = runs["gguf-bert"], runs["gguf-llama"]
    succeeded(served, bert)
    show_run(page, "gguf-bert", bert)
    button = page.locator("#export-gguf")
    deadline = time.monotonic() + 20
    while button.is_disabled():
        assert time.monotonic() < deadline, "the GGUF button stayed disabled for a causal-LM run"
        time.sleep(0.3)
    button.click()
    msg = wait_text(page, "#gguf-msg", r"✗", timeout_s=60)
    assert re.search(r"llama", msg, re.I), msg
    assert not page.locator("#gguf-file").is_visible()
    succeeded(served, llama)
    show_run(page, "gguf-llama", llama)
    page.locator("#gguf-quant input").click()
    page.get_by_role("option", name="q8_0").click()
    page.locator("#export-gguf").click()
    wait_text(page, "#gguf-msg", r"GGUF \(q8_0\)", timeout_s=180)
    with page.expect_download() as dl:
        page.locator("#gguf-file a").first.click()
    assert dl.value.suggested_filename.endswith(".gguf")
    with open(dl.value.path(), "rb") as f:
        assert f.read(4) == b"GGUF"
