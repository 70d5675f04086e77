"""The Launch and Runs views a newcomer meets (#24), without a browser: the CPU estimate on
a CPU-only studio, one parameter count, catalog models offered for estimating only,
per-method learning rates in the form and in method sweeps, one estimate figure per run,
no ETA once a run has ended, and resume offered only where it can succeed."""

from __future__ import annotations

from engine.methods import METHODS, default_learning_rate
from studio import checks, compare, service
from studio.ui import forms, launch_tab, runs_tab

from test_ui_logic import fake_run, launch_form


def view(gpu: str, model: str = "minilm", method: str = "lora", **over):
    form = launch_form(model=model, method=method, **over)
    fields = {f: form[f] for f in forms.METHOD_FIELDS}
    return launch_tab.estimate_view(model, form["task"], method, fields, "", 8, 64, "model", gpu, "fp32", "none",
                                    launch_tab.gpu_label(gpu, []))


def test_the_cpu_estimate_has_no_cuda_context_and_says_it_is_for_the_cpu():
    fig, cpu = view(launch_tab.CPU)
    _, gpu = view(str(int(launch_tab.DEFAULT_GPU)))
    assert "estimated for the **CPU** (no CUDA context" in cpu and "estimated for a **CUDA** GPU" in gpu
    assert "CUDA context 0.000" in cpu and "CUDA context 0.000" not in gpu
    total = lambda t: float(t.split("**Total: ")[1].split(" GiB")[0])   # noqa: E731
    assert total(gpu) - total(cpu) >= 0.9                                # the 1 GiB context is the difference
    assert "on CPU (this machine)" in cpu


def test_launch_shows_the_parameter_count_the_worker_records():
    """MiniLM + LoRA r=8 on query,value: 74,498 trainable of 22,787,714 (the adapted model, as the
    worker counts it; the estimator alone says 22,713,986, the base without the 73,728 LoRA weights)."""
    _, text = view(launch_tab.CPU, target_modules="query,value")
    assert "Trainable: **74,498** of 22,787,714 parameters" in text
    lora = {"name": "lora", "r": 8, "target_modules": ["query", "value"]}
    assert checks.parameter_counts("minilm", "classification", lora) == (22787714, 74498)


def test_every_catalog_model_is_offered_and_marked_estimate_only():
    from engine.estimator import catalog_names

    labels = dict((v, label) for label, v in forms.MODEL_CHOICES)
    assert set(catalog_names()) <= set(labels)
    assert labels["llama-3-8b"] == "llama-3-8b (estimate only)" and labels["minilm"] == "minilm"
    assert labels["smollm2-135m"] == "smollm2-135m"
    _, text = view(launch_tab.CPU, model="llama-3-8b", task="causal_lm", target_modules="q_proj,v_proj")
    assert "llama-3-8b is in the catalog only" in text and "**Total:" in text


def test_the_form_shows_each_methods_measured_learning_rate():
    assert all(forms.default_lr(name) == default_learning_rate(name) for name in METHODS)
    cfg = forms.build_config(launch_form(lr=""))                        # emptied: the method's default
    assert "learning_rate" not in cfg["training"]
    assert service.validate_config(cfg).training.learning_rate == default_learning_rate("lora")
    sweep = forms.sweep_configs(launch_form(lr=forms.default_lr("lora")), "method: lora, ia3")
    assert [c["training"]["learning_rate"] for c in sweep] == [forms.default_lr("lora"), forms.default_lr("ia3")]
    mine = forms.sweep_configs(launch_form(lr=2e-4), "method: lora, ia3")   # a rate the person typed is kept
    assert [c["training"]["learning_rate"] for c in mine] == [2e-4, 2e-4]
    assert forms.form_from_config({"model": "m", "method": {"name": "ia3"}, "training": {}})["lr"] == \
        default_learning_rate("ia3")


def test_the_runs_table_shows_the_estimate_compare_shows():
    run = fake_run(1, estimated_peak_bytes=int(1.137 * 2 ** 30),
                   estimate={"device": "cpu", "rows": {"total": int(0.165 * 2 ** 30)}})
    est_col = runs_tab.RUN_COLUMNS.index("est. peak GiB")
    assert runs_tab.run_row(run)[est_col] == 0.165
    assert compare.estimate_of(run) == (int(0.165 * 2 ** 30), "cpu")
    submit_only = fake_run(2, estimated_peak_bytes=2 ** 30, estimate=None)  # not claimed yet: the submit figure
    assert runs_tab.run_row(submit_only)[est_col] == 1.0


def test_an_eta_shows_only_while_the_run_runs():
    metrics = [{"step": 3, "loss": 0.5, "tokens_per_s": 10.0, "eta_s": 75.0, "eval": None}]
    base = dict(id=1, name="r", steps_done=3, max_steps=9, phase=None, error=None)
    running = runs_tab.run_status_md({**base, "status": "running", "phase": "evaluating: 8 / 40 rows"}, metrics)
    assert "ETA **1m15s**" in running and "_evaluating: 8 / 40 rows_" in running
    for status in ("succeeded", "cancelled", "failed"):
        ended = runs_tab.run_status_md({**base, "status": status, "phase": "evaluating: 8 / 40 rows"}, metrics)
        assert "ETA" not in ended and "evaluating" not in ended and "tokens/s **10.0**" in ended


def test_resume_is_offered_only_where_it_can_succeed():
    assert service.not_resumable({"status": "cancelled"}) is None
    assert service.not_resumable({"status": "failed", "results": {"steps": 3}}) is None
    assert "failed on its config" in service.not_resumable({"status": "failed", "results": {"failed_on": "config"}})
    assert service.not_resumable({"status": "succeeded"}).startswith("is succeeded")
