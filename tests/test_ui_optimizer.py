"""The Launch form's optimizer selector (training.optimizer: adamw | adamw_8bit |
paged_adamw_8bit): the choice reaches the run config, the stored run estimate and
the live estimate panel, and a clone keeps it. No browser: the form's pure functions
and the tab's components built in a gr.Blocks."""

from __future__ import annotations

import gradio as gr
import pytest

from engine import optim
from engine.config import parse_run_config
from engine.estimator import estimate
from studio import service
from studio.ui import forms, launch_tab
from studio.ui.common import GIB, Ctx

OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw_8bit"]


def launch_form(**over) -> dict:
    """The Launch form's first-load values on the fast random tiny-bert, plus overrides."""
    form = {"run_name": "", "model": "tiny-bert", "task": "classification", "method": "lora", "extra_method": "",
            "ds_source": "bundled", "ds_name": "demo-sentiment", "upload_path": "", "text_col": None,
            "label_col": None, "prompt_col": None, "response_col": None, "max_rows": 0, "max_steps": 30,
            "batch": 8, "lr": 5e-4, "seq": 64, "eval_every": 10, "seed": 0, "strategy": "ddp", "devices": 1,
            "optimizer": "adamw"}
    for f in forms.METHOD_FIELDS:
        form[f] = forms.field_default("lora", f, "tiny-bert") if f in forms.method_fields("lora") else None
    form.update(over)
    return form


def panel(optimizer: str, **over) -> str:
    form = launch_form(**over)
    fields = {f: form[f] for f in forms.METHOD_FIELDS}
    _, text = launch_tab.estimate_view(form["model"], form["task"], form["method"], fields, "", form["batch"],
                                       form["seq"], "model", str(int(24e9)), "fp32", "none", "24 GB",
                                       optimizer=optimizer)
    return text


def test_the_choices_are_the_configs_and_the_engines():
    assert forms.OPTIMIZERS == OPTIMIZERS == list(optim.OPTIMIZERS)
    assert forms.DEFAULT_OPTIMIZER == "adamw" == parse_run_config(forms.build_config(launch_form())).training.optimizer


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_the_chosen_optimizer_reaches_the_run_config_and_its_stored_estimate(opt):
    cfg = forms.build_config(launch_form(optimizer=opt))
    assert cfg["training"].get("optimizer", "adamw") == opt
    parsed = parse_run_config(cfg)
    assert parsed.training.optimizer == opt
    stored = service.estimate_for(parsed)       # what a submitted run keeps and the capacity check reads
    direct = estimate("tiny-bert", parsed.method.model_dump(exclude_none=True), batch_size=8, seq_len=64,
                      task="classification", optimizer=opt, dtype="bf16")   # precision auto, made for CUDA
    assert stored["rows"]["optimizer"] == direct.rows["optimizer"] > 0
    assert stored["rows"]["total"] == direct.total


def test_the_default_stays_implicit_and_a_clone_keeps_the_choice():
    assert "optimizer" not in forms.build_config(launch_form())["training"]
    for opt in OPTIMIZERS:
        cfg = forms.build_config(launch_form(optimizer=opt, run_name="x"))
        back = forms.form_from_config(cfg)
        assert back["optimizer"] == opt
        again = forms.build_config(back)
        assert again["training"] == cfg["training"]


def test_an_unknown_optimizer_is_refused_naming_the_field():
    with pytest.raises(service.SubmitError, match=r"training\.optimizer: 'sgd' is not one of adamw, adamw_8bit"):
        forms.build_config(launch_form(optimizer="sgd"))
    assert "training.optimizer" in panel("lion")       # the panel says why instead of raising


def test_the_live_estimate_follows_the_optimizer():
    texts = {opt: panel(opt) for opt in OPTIMIZERS}
    ests = {opt: estimate("tiny-bert", forms.build_method("lora", {f: launch_form()[f] for f in forms.METHOD_FIELDS}),
                          batch_size=8, seq_len=64, task="classification", optimizer=opt) for opt in OPTIMIZERS}
    for opt, text in texts.items():
        assert f"**Total: {ests[opt].total / GIB:.3f} GiB**" in text, text
        assert f"fp32, {opt})" in text
    # 8-bit states: about 2 bytes per trainable parameter instead of 8
    assert ests["adamw_8bit"].rows["optimizer"] <= 0.3 * ests["adamw"].rows["optimizer"]
    assert ests["adamw_8bit"].total < ests["adamw"].total
    # paged: a host-memory line with the states; the others have none
    host = f"Host memory (paged_adamw_8bit states): **{ests['paged_adamw_8bit'].rows['optimizer'] / GIB:.3f} GiB**"
    assert host in texts["paged_adamw_8bit"]
    assert "Host memory" not in texts["adamw"] and "Host memory" not in texts["adamw_8bit"]


def test_the_launch_tab_has_the_selector_and_passes_it_on():
    with gr.Blocks():
        tab = launch_tab.LaunchTab(Ctx(settings=None))
    assert tab.form["optimizer"] is tab.optimizer
    assert [c[1] if isinstance(c, tuple) else c for c in tab.optimizer.choices] == OPTIMIZERS
    assert tab.optimizer.value == "adamw"
    values = launch_form(optimizer="paged_adamw_8bit")
    data = {comp: values.get(key) for key, comp in tab.form.items()}
    cfg = forms.build_config(tab.values(data))
    assert parse_run_config(cfg).training.optimizer == "paged_adamw_8bit"
