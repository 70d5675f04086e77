"""The studio's UI helpers without a browser: method-derived form controls,
form -> run config (and back), sweeps, the estimate panel, the runs table,
comparisons, and the artifacts built from a real finished run (merged model,
playground, subspace similarity)."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from engine.methods import METHODS, parse_method_config
from engine.estimator import GPU_PRESETS
from studio import charts, compare, service
from studio.ui import compare_tab, forms, launch_tab, runs_tab


def launch_form(**over) -> dict:
    """The Launch form with its first-load values, but on the fast random tiny-bert, plus overrides."""
    form = {"run_name": "", "model": "tiny-bert", "task": "classification", "method": "lora", "extra_method": "",
            "ds_source": "bundled", "ds_name": "demo-sentiment", "upload_path": "", "text_col": None,
            "label_col": None, "prompt_col": None, "response_col": None, "max_rows": 0, "max_steps": 30,
            "batch": 8, "lr": 5e-4, "seq": 64, "eval_every": 10, "seed": 0}
    method = over.get("method", "lora")
    for f in forms.METHOD_FIELDS:
        form[f] = forms.field_default(method, f, over.get("model", "tiny-bert")) if f in forms.method_fields(method) else None
    form.update(over)
    return form


# ------------------------------------------------------------------ method controls

def test_controls_come_from_each_methods_config_class():
    assert {"r", "alpha", "dropout", "target_modules", "use_rslora", "init"} <= forms.method_fields("lora")
    assert "r" not in forms.method_fields("bitfit") and "r" not in forms.method_fields("prompt_tuning")
    assert "num_virtual_tokens" in forms.method_fields("prompt_tuning")
    assert "k" in forms.method_fields("top_k")
    for name, spec in METHODS.items():
        assert forms.method_fields(name) <= set(spec.config_cls.model_fields)
    assert forms.field_default("adalora", "alpha") == 32.0 and forms.field_default("lora", "alpha") == 16.0
    assert forms.field_default("lora", "target_modules", "smollm2-135m") == "q_proj,v_proj"
    assert forms.field_choices("lora", "init") == ["kaiming", "gaussian", "pissa"]
    # each method's help is its own spec's words: what it trains, whether it merges, and its paper
    for name, spec in METHODS.items():
        text = forms.method_help(name)
        assert spec.summary in text and spec.trains in text and spec.paper in text, name
        assert ("mergeable into the base weights" in text) is spec.mergeable, name
        assert ("not mergeable" in text) is (not spec.mergeable), name
    assert "Hu et al." in forms.method_help("lora") and "not mergeable" in forms.method_help("prompt_tuning")
    assert forms.method_help("no-such-method") == ""


def test_first_load_is_a_real_model_on_real_data_with_lora():
    """The default Launch form trains MiniLM on the sentiment demo with LoRA, and is valid as it stands."""
    assert (forms.DEFAULT_MODEL, forms.DEFAULT_DATASET, forms.DEFAULT_METHOD) == ("minilm", "demo-sentiment", "lora")
    values = [v for _, v in forms.MODEL_CHOICES]
    assert values[0] == "minilm" and {"tiny-bert", "tiny-llama"} <= set(values)
    form = launch_form(model=forms.DEFAULT_MODEL, task=forms.default_task(forms.DEFAULT_MODEL))
    cfg = forms.build_config(form)
    assert cfg["model"] == "minilm" and cfg["task"] == "classification"
    assert cfg["dataset"] == {"name": "demo-sentiment"} and cfg["method"]["target_modules"] == ["query", "value"]
    assert service.validate_config(cfg).method.name == "lora"
    assert forms.default_task("smollm2-135m") == "causal_lm" and forms.default_dataset("causal_lm") == "demo-instruct"
    assert forms.default_task("some/hub-model") is None and forms.default_targets("some/hub-model") == ""


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_builds_a_valid_method_section_from_its_defaults(method):
    m = forms.build_method(method, {f: forms.field_default(method, f, "tiny-bert") for f in forms.method_fields(method)})
    assert parse_method_config(m).name == method


def test_form_to_config_validates_and_round_trips():
    cfg = forms.build_config(launch_form(r=4, target_modules="query, value", max_rows=100))
    assert cfg["name"] == "tiny-bert-lora-r4"
    assert cfg["method"]["r"] == 4 and cfg["method"]["target_modules"] == ["query", "value"]
    assert cfg["dataset"] == {"name": "demo-sentiment", "max_rows": 100}
    parsed = service.validate_config(cfg)
    assert parsed.method.r == 4
    back = forms.form_from_config(parsed.to_dict())
    again = forms.build_config({**launch_form(), **back})
    assert again["method"]["r"] == 4 and again["name"] == "tiny-bert-lora-r4-copy"
    assert again["method"]["target_modules"] == ["query", "value"]


def test_devices_and_strategy_go_into_the_run_config():
    """training.distributed is written only when it is not the default (one device, ddp)."""
    assert "distributed" not in forms.build_config(launch_form())["training"]
    assert "distributed" not in forms.build_config(launch_form(devices=1, strategy="ddp"))["training"]
    cfg = forms.build_config(launch_form(devices=4, strategy="fsdp"))
    assert cfg["training"]["distributed"] == {"strategy": "fsdp", "world_size": 4}
    parsed = service.validate_config(cfg)
    assert (parsed.training.distributed.strategy, parsed.training.distributed.world_size) == ("fsdp", 4)
    back = forms.form_from_config(parsed.to_dict())
    assert (back["strategy"], back["devices"]) == ("fsdp", 4)
    assert forms.build_config({**launch_form(), **back})["training"]["distributed"]["world_size"] == 4
    assert forms.build_config(launch_form(devices=1, strategy="fsdp"))["training"]["distributed"] == \
        {"strategy": "fsdp", "world_size": 1}
    assert forms.build_config(launch_form(devices="2"))["training"]["distributed"] == {"strategy": "ddp", "world_size": 2}
    for bad in (0, -2, 2.5, "two"):
        with pytest.raises(service.SubmitError, match="training.distributed.world_size"):
            forms.build_config(launch_form(devices=bad))
    with pytest.raises(service.SubmitError, match="training.distributed.strategy"):
        forms.build_config(launch_form(strategy="zero3"))
    sweep = forms.sweep_configs(launch_form(devices=2), "r: 4, 8")
    assert [c["training"]["distributed"]["world_size"] for c in sweep] == [2, 2]


def test_form_errors_name_the_field():
    with pytest.raises(service.SubmitError, match="method.target_modules"):
        service.validate_config(forms.build_config(launch_form(target_modules="query,valeu")))
    with pytest.raises(service.SubmitError, match="learning_rate"):
        forms.build_config(launch_form(lr="fast"))
    with pytest.raises(service.SubmitError, match="upload a file"):
        forms.build_config(launch_form(ds_source="upload"))
    with pytest.raises(service.SubmitError, match="YAML"):
        forms.build_config(launch_form(extra_method="a: [1"))
    assert forms.build_config(launch_form(extra_method="rank_pattern: {query: 2}"))["method"]["rank_pattern"] == {"query": 2}
    assert forms.parse_modules("re:.*query") == ".*query" and forms.parse_modules("all-linear") == "all-linear"
    assert forms.parse_modules(" query , value ,") == ["query", "value"]


def test_sweeps_queue_one_config_per_value():
    cfgs = forms.sweep_configs(launch_form(), "r: 4, 8, 16")
    assert [c["method"]["r"] for c in cfgs] == [4, 8, 16]
    assert [c["name"] for c in cfgs] == ["tiny-bert-lora-r4", "tiny-bert-lora-r8", "tiny-bert-lora-r16"]
    cfgs = forms.sweep_configs(launch_form(run_name="cmp"), "method: lora, ia3, bitfit")
    assert [c["method"]["name"] for c in cfgs] == ["lora", "ia3", "bitfit"]
    assert [c["name"] for c in cfgs] == ["cmp-lora", "cmp-ia3", "cmp-bitfit"]
    assert "r" not in cfgs[2]["method"]
    for c in cfgs:
        service.validate_config(c)
    cfgs = forms.sweep_configs(launch_form(), "learning_rate: 1e-4, 5e-4")
    assert [c["training"]["learning_rate"] for c in cfgs] == [1e-4, 5e-4]
    for bad, msg in (("", "give the values"), ("depth: 1, 2", "sweep: write"), ("r:", "no values"),
                     ("method: lora, nope", "unknown method")):
        with pytest.raises(service.SubmitError, match=msg):
            forms.sweep_configs(launch_form(), bad)
    with pytest.raises(service.SubmitError, match="no rank"):
        forms.sweep_configs(launch_form(method="bitfit"), "r: 4, 8")


# ------------------------------------------------------------------ estimate panel

def estimate_text(**over):
    form = launch_form(**over)
    fields = {f: form[f] for f in forms.METHOD_FIELDS}
    fig, text = launch_tab.estimate_view(form["model"], form["task"], form["method"], fields, "", over.get("batch", 8), 64,
                                 over.get("formula", "model"), str(int(24e9)), "fp32", "none", "24 GB")
    return fig, text


def test_estimate_panel_follows_the_rank_and_reports_fit():
    fig4, t4 = estimate_text(r=4)
    fig16, t16 = estimate_text(r=16)
    assert t4 != t16 and "Trainable: **1,090**" in t4 and "Trainable: **4,162**" in t16
    assert "fits** on 24 GB" in t4 and "largest batch per device that fits" in t4
    assert "fewest devices that fit: **1** (ddp)" in t4
    names = [tr.name for tr in fig4.data]
    assert names == ["CUDA context", "Weights", "Gradients", "Activations", "Optimizer states"]
    assert fig4.layout.barmode == "stack" and fig4.layout.shapes   # the GPU line
    _, slide = estimate_text(r=4, formula="slide")
    assert "slide formula" in slide
    _, big = estimate_text(model="llama-2-70b", task="causal_lm", target_modules="q_proj,v_proj", batch=64)
    assert "does not fit" in big
    _, bad = estimate_text(target_modules="query,valeu", model="nope-model")
    assert bad.startswith("⚠ Estimate unavailable")


def test_estimate_is_per_device_and_names_the_fewest_devices_that_fit():
    """llama-2-70b full fine-tuning does not fit one 80 GiB GPU; FSDP over enough of them does."""
    from engine.estimator import estimate, smallest_world_size_that_fits

    gpu = next(b for name, b in GPU_PRESETS if name.startswith("80 GB"))
    form = launch_form(model="llama-2-70b", task="causal_lm", method="full")
    fields = {f: form[f] for f in forms.METHOD_FIELDS}

    def view(devices, strategy):
        return launch_tab.estimate_view("llama-2-70b", "causal_lm", "full", fields, "", 1, 64, "model", str(gpu),
                                        "bf16", "none", "80 GB", world_size=devices, strategy=strategy)

    kw = dict(batch_size=1, seq_len=64, dtype="bf16", task="causal_lm")
    n = smallest_world_size_that_fits(gpu, "llama-2-70b", {"name": "full"}, strategy="fsdp", **kw)
    assert n > 1
    assert estimate("llama-2-70b", {"name": "full"}, world_size=n, strategy="fsdp", **kw).total <= gpu
    assert estimate("llama-2-70b", {"name": "full"}, world_size=n - 1, strategy="fsdp", **kw).total > gpu
    _, one = view(1, "ddp")
    assert "does not fit** on 80 GB" in one and "per device," not in one
    assert f"no device count fits with ddp; fewest with fsdp: **{n}**" in one
    fig, many = view(n, "fsdp")
    assert f"✓ fits** on {n} × 80 GB" in many and f"fewest devices that fit: **{n}** (fsdp)" in many
    assert f"per device, {n} × fsdp" in many and "per device" in fig.layout.title.text
    _, fewer = view(n - 1, "fsdp")
    assert f"does not fit** on {n - 1} × 80 GB" in fewer
    per_device = float(many.split("**Total: ")[1].split(" GiB")[0])
    assert per_device < float(one.split("**Total: ")[1].split(" GiB")[0]) / 4
    _, replicas = view(8, "ddp")       # DDP keeps a full replica per device: it fits no better
    assert "does not fit** on 8 × 80 GB" in replicas
    _, bad = view(0, "ddp")
    assert bad.startswith("⚠ Estimate unavailable") and "world_size" in bad


def test_gpu_choices_add_worker_gpus():
    workers = [{"name": "w1", "device": "cuda:NVIDIA H100 80GB HBM3", "total_memory": 85_000_000_000},
               {"name": "cpu1", "device": "cpu", "total_memory": 24_000_000_000}]
    ch = launch_tab.gpu_choices(workers)
    assert ch[0][1] == launch_tab.CPU and "no CUDA context" in ch[0][0]        # this machine's CPU first
    assert [v for _, v in ch[1:6]] == [str(int(b)) for _, b in GPU_PRESETS]    # the estimator's presets
    assert len(ch) == 7 and ch[-1] == ("w1: NVIDIA H100 80GB HBM3 (85 GB)", "85000000000")
    assert launch_tab.gpu_label("85000000000", workers).startswith("w1:")
    # the menu starts on a GPU where one is in reach, else on the CPU (this test machine has none)
    assert launch_tab.default_device(workers) == str(int(launch_tab.DEFAULT_GPU))
    assert launch_tab.default_device(workers[1:]) == launch_tab.CPU


# ------------------------------------------------------------------ runs table and compare

def fake_run(i, **kw):
    r = {"id": i, "name": f"run{i}", "model": "tiny-bert", "method": "lora", "rank": 4 * i, "status": "succeeded",
         "n_params": 1000, "n_trainable": 10 * i, "best_metric": 0.5 + i / 100, "estimated_peak_bytes": 2 ** 30,
         "measured_peak_bytes": 2 ** 29, "tokens_per_s": 100.0 * i, "duration_s": 2.0, "owner": "alice",
         "metric_name": "accuracy", "final_loss": 0.6, "task": "classification", "adapter": {"size": 2048},
         "config": {"name": f"run{i}", "method": {"name": "lora", "r": 4 * i, "target_modules": ["query", "value"]},
                    "training": {"seed": 0}}}
    r.update(kw)
    return r


def test_runs_table_filters_and_sorts():
    rows = [runs_tab.run_row(fake_run(1)), runs_tab.run_row(fake_run(2, status="failed", owner=None)),
            runs_tab.run_row(fake_run(3, method="dora", tokens_per_s=None))]
    assert [r[0] for r in runs_tab.filter_sort(rows)] == [3, 2, 1]
    assert [r[0] for r in runs_tab.filter_sort(rows, status="failed")] == [2]
    assert [r[0] for r in runs_tab.filter_sort(rows, query="dora")] == [3]
    assert [r[0] for r in runs_tab.filter_sort(rows, query="lora alice")] == [1]
    assert [r[0] for r in runs_tab.filter_sort(rows, sort_by="tokens/s", descending=False)] == [1, 2, 3]  # None last
    assert rows[1][-1] == "–" and rows[0][6] == 1.0


def test_run_status_shows_resume_and_ranks():
    fresh = fake_run(1, steps_done=3, max_steps=10, worker_host="w1", device="cpu", resumed_from_step=None,
                     attempts=1)
    md = runs_tab.run_status_md(fresh, [])
    assert "resumed" not in md and "worker: w1 · device: cpu" in md and "ranks" not in md
    resumed = fake_run(1, steps_done=12, max_steps=30, worker_host="w2", device="cpu", resumed_from_step=10,
                       attempts=2)
    assert runs_tab.resumed_text(resumed) == "resumed from step **10** (attempt 2)"
    assert "resumed from step **10** (attempt 2)" in runs_tab.run_status_md(resumed, [])
    assert runs_tab.resumed_text(fake_run(1, resumed_from_step=0, attempts=3)) == "resumed from step **0** (attempt 3)"
    dist = fake_run(2, worker_host="w1", device="cuda:0", config={"training": {"distributed": {
        "strategy": "fsdp", "world_size": 4}}})
    assert runs_tab.distributed_of_run(dist) == ("fsdp", 4)
    assert "**4 ranks** (fsdp)" in runs_tab.placement_text(dist)
    ranked = {**dist, "ranks": [{"rank": 0, "host": "w1", "device": "cuda:0"}, {"rank": 1, "host": "w2",
                                                                                 "device": "cuda:1"}]}
    assert "rank 1: w2 cuda:1" in runs_tab.placement_text(ranked)
    assert runs_tab.distributed_of_run(fake_run(3)) == ("ddp", 1)


def test_compare_helpers():
    a, b = fake_run(1), fake_run(2)
    header, rows = compare.config_table([a, b], differences_only=True)
    assert header == ["key", "#1 run1", "#2 run2"]
    assert [r[0] for r in rows] == ["name", "method.r"]
    _, all_rows = compare.config_table([a, b])
    assert ["method.target_modules", "query, value", "query, value"] in all_rows
    table = compare.comparison_table([a, b])
    text = compare.to_csv(compare.TABLE_COLUMNS, table)
    assert text.splitlines()[0].startswith("id,name,model,method,rank") and len(text.splitlines()) == 3
    pts = compare.with_x([{"step": 1, "tokens_per_s": 10.0, "elapsed_s": 2.0, "loss": 1.0},
                          {"step": 2, "tokens_per_s": None, "elapsed_s": 3.0, "loss": 0.9}], "tokens")
    assert pts == [{"step": 1, "tokens_per_s": 10.0, "elapsed_s": 2.0, "loss": 1.0, "x": 20.0}]
    assert compare.parse_run_ids(["#3 a (lora, succeeded)", "#3 again", 5, "junk"]) == [3, 5]
    assert compare.metric_name_of([a, b]) == "accuracy"
    col = compare.TABLE_COLUMNS.index
    dist = fake_run(4, tokens_per_s=400.0, memory_kind="cpu_peak_rss",
                    config={"training": {"distributed": {"strategy": "ddp", "world_size": 4}}})
    row = compare.comparison_row(dist)
    assert (row[col("devices")], row[col("tokens/s")], row[col("tokens/s per device")]) == (4, 400.0, 100.0)
    assert row[col("measured as")] == "CPU peak RSS (process)"
    one = compare.comparison_row(a)
    assert (one[col("devices")], one[col("tokens/s per device")], one[col("measured as")]) == (1, 100.0, None)
    assert compare.measured_kinds_label([dist]) == "CPU peak RSS (process)"
    assert compare.measured_kinds_label([dist, fake_run(5, memory_kind="cuda_max_allocated")]) == "mixed: see the table"
    fig = charts.throughput_bars(["a", "b"], [400.0, None], [4, 1])
    assert [list(t.y) for t in fig.data] == [[400.0, None], [100.0, None]]


def test_lora_runs_are_those_of_the_lora_family():
    """The subspace heatmap is offered for finished runs whose method's spec says family 'lora'."""
    for name, spec in METHODS.items():
        assert compare.is_lora_run(fake_run(1, method=name)) == (spec.family == "lora"), name
    assert {n for n in METHODS if compare.is_lora_run(fake_run(1, method=n))} >= {"lora", "dora", "qlora"}
    assert not compare.is_lora_run(fake_run(1, method="ia3"))
    assert not compare.is_lora_run(fake_run(1, status="failed"))
    assert not compare.is_lora_run(fake_run(1, method="no-such-method"))


# ------------------------------------------------------------------ artifacts from real runs

def tiny_run_config(name, r):
    return {"name": name, "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 120},
            "method": {"name": "lora", "r": r, "alpha": 2 * r, "target_modules": ["query", "value"]},
            "training": {"max_steps": 6, "batch_size": 8, "learning_rate": 2e-2, "max_seq_len": 32, "eval_every": 3,
                         "eval_batches": 1}}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """Two LoRA runs and one BitFit run trained in this process (no server)."""
    from studio.runtime import prepare_database
    from workers.settings import load_settings
    from workers.tasks import execute_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_DATA_DIR", str(tmp_path_factory.mktemp("artifacts") / "data"))
        mp.delenv("STUDIO_DATABASE_URL", raising=False)
        mp.delenv("STUDIO_BROKER_URL", raising=False)
        settings = load_settings()
        prepare_database(settings)
        ids = []
        for cfg in (tiny_run_config("a", 4), tiny_run_config("b", 8),
                    {**tiny_run_config("c", 4), "method": {"name": "houlsby", "bottleneck_size": 4}}):
            rid = service.submit_run(settings, cfg, owner="alice")
            assert execute_run(rid, settings) == "succeeded", service.get_run(settings, rid)["error"]
            ids.append(rid)
        yield settings, ids


def test_adapter_download_is_a_verified_file_not_bytes(finished):
    """The Runs tab offers the store's verified local copy under the run's download name."""
    import hashlib

    from studio.ui.common import link_download

    settings, (a, _b, _c) = finished
    path = runs_tab.adapter_download(settings, a)
    assert isinstance(path, str) and path.endswith(f"a-run{a}-lora.zip")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == service.get_run(settings, a)["adapter"]["sha256"]
    assert "adapter_config.json" in zipfile.ZipFile(path).namelist()
    assert runs_tab.adapter_download(settings, 999999) is None
    src, _ = service.adapter_file(settings, a)
    again = link_download(src, "x/../../evil name.zip")
    assert again.endswith("evil_name.zip") and open(again, "rb").read() == open(path, "rb").read()


def test_merged_model_equals_base_plus_adapter(finished):
    import torch
    from transformers import AutoModelForSequenceClassification

    from studio import artifacts, playground

    settings, (a, _b, adapters_only) = finished
    path, name = artifacts.merged_zip_path(settings, a)
    assert name.endswith("-merged.zip") and path.exists()
    assert artifacts.merged_zip_path(settings, a)[0] == path          # built once
    z = zipfile.ZipFile(path)
    assert {"config.json", "model.safetensors", "README.md", "run_config.json"} <= set(z.namelist())
    out = path.parent / "unzipped"
    z.extractall(out)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    pair = playground.pair_for(settings, a)
    enc = pair.tokenizer(["a wonderful, moving film"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, pair.adapted(**enc).logits, atol=1e-5, rtol=1e-4)
    with pytest.raises(artifacts.ArtifactError, match="does not merge"):
        artifacts.merged_zip_path(settings, adapters_only)


def test_playground_compares_base_and_adapter(finished):
    from studio import playground

    settings, (a, _b, houlsby) = finished
    res = playground.try_run(settings, a, "what a great film")
    assert res["task"] == "classification"
    assert set(res["base"]) == set(res["adapted"]) and len(res["base"]) >= 2
    assert abs(sum(res["adapted"].values()) - 1) < 1e-5 and res["base"] != res["adapted"]
    assert playground.try_run(settings, houlsby, "dull")["task"] == "classification"   # own-format adapter
    assert len(playground.CACHE.keys()) <= playground.CACHE_SIZE
    with pytest.raises(ValueError, match="type some text"):
        playground.try_run(settings, a, "  ")


def test_compare_view_of_two_lora_runs(finished):
    settings, (a, b, c) = finished
    v = compare_tab.compare_view(settings, [a, b, c], "tokens seen", True)
    assert len(v["loss"].data) == 3 and v["loss"].layout.xaxis.title.text == "tokens seen"
    assert v["tradeoff"].layout.xaxis.type == "log"
    assert [r["id"] for r in v["lora_pair"]] == [a, b]
    assert open(v["csv"]).read().count("\n") == 4
    phi = compare.subspace_similarity(settings, a, b)
    m = phi["bert.encoder.layer.0.attention.self.query"]
    assert len(m) == 4 and len(m[0]) == 8 and all(0 <= x <= 1 for row in m for x in row)
    fig = charts.similarity_heatmap(m, "q", "a", "b")
    assert fig.data[0].type == "heatmap"


def test_the_run_guard_hides_other_peoples_runs(finished):
    """Ctx.visible_run: the one check every Runs / Playground action makes before touching a run."""
    import gradio as gr

    from studio.auth import Auth
    from studio.ui.common import Ctx, NoRunSelected, error_text

    settings, (a, _b, _c) = finished
    ctx = Ctx(settings, Auth(users={"alice": "x", "bob": "y", "root": "z"}, admins={"root"}))
    assert ctx.visible_run(a, gr.Request(username="alice"))["id"] == a
    assert ctx.visible_run(str(a), gr.Request(username="root"))["id"] == a
    with pytest.raises(service.NotFound, match=f"run {a} not found"):
        ctx.visible_run(a, gr.Request(username="bob"))
    with pytest.raises(service.NotFound, match="run 999999 not found"):
        ctx.visible_run(999999, gr.Request(username="alice"))
    with pytest.raises(NoRunSelected) as e:
        ctx.visible_run(None, gr.Request(username="alice"))
    assert error_text(e.value).startswith("Select a run") and error_text(service.NotFound("x")) == "✗ x"
    assert [r["id"] for r in ctx.visible_runs(gr.Request(username="bob"))] == []
    assert Ctx(settings).visible_run(a, None)["id"] == a       # no login: everyone sees everything


def test_merged_route_over_rest(finished):
    """GET /api/runs/{id}/merged through the FastAPI app (no server process)."""
    from fastapi.testclient import TestClient

    from studio.api import build_api

    settings, (a, _b, c) = finished
    with TestClient(build_api(settings)) as client:
        r = client.get(f"/runs/{a}/merged")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        assert "model.safetensors" in zipfile.ZipFile(io.BytesIO(r.content)).namelist()
        assert client.get(f"/runs/{c}/merged").status_code == 409
        assert client.get("/runs/999999/merged").status_code == 404
        assert "/runs/{run_id}/merged" in client.get("/openapi.json").json()["paths"]
        assert json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("run_config.json"))["name"] == "a"


def test_run_status_shows_data_preparation_and_eval_rows():
    preparing = fake_run(5, status="running", steps_done=0, max_steps=10,
                         phase="preparing data: 1.2M / 2.8M rows (train)")
    md = runs_tab.run_status_md(preparing, [])
    assert "_preparing data: 1.2M / 2.8M rows (train)_" in md
    # a finished run's stale phase is not shown
    assert "preparing" not in runs_tab.run_status_md({**preparing, "status": "succeeded"}, [])
    metrics = [{"step": 10, "loss": 0.5, "eval": {"eval_loss": 0.4, "accuracy": 0.75, "eval_rows": 2000}}]
    md = runs_tab.run_status_md(fake_run(6, steps_done=10, max_steps=10), metrics)
    assert "validation: eval_loss 0.4000, accuracy 0.7500 (on 2,000 rows)" in md
    assert "eval_rows" not in md
