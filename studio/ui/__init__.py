"""The Gradio UI: Launch (config + live memory estimate), Runs (live progress,
actions, downloads), Compare (runs side by side), Playground (base vs adapter),
Studies (each method tuned within one budget), Benchmarks (lm-evaluation-harness jobs, runs x
tasks), one module per tab, and an "API keys" accordion (keys_panel); the form helpers they
share are in `forms`. Everything shown
is read from the database, so a reopened browser shows the same state."""

from __future__ import annotations

import gradio as gr

from workers.settings import Settings

from .common import Ctx
from .benchmarks_tab import BenchmarksTab
from .compare_tab import CompareTab
from .keys_panel import KeysPanel
from .launch_tab import LaunchTab
from .playground_tab import PlaygroundTab
from .runs_tab import RunsTab
from .studies_tab import StudiesTab

POLL_S = 2.0


def build_ui(settings: Settings, auth=None) -> gr.Blocks:
    """The Blocks app. With `auth` (a studio.auth.Auth with users), each request's
    logged-in user is recorded on runs and non-admins see only their own runs."""
    ctx = Ctx(settings, auth)
    with gr.Blocks(title="PEFT Studio", analytics_enabled=False) as demo:
        gr.Markdown("# PEFT Studio\nPick a model, a PEFT method and its size; see the memory it needs; "
                    "launch; watch; compare; try; download an adapter that Hugging Face `peft` loads as-is.")
        selected_store = gr.BrowserState(None, storage_key="peft-studio-selected-run")
        with gr.Tabs(selected="launch") as tabs:
            with gr.Tab("Launch", id="launch", elem_id="tab-launch"):
                launch = LaunchTab(ctx)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                runs = RunsTab(ctx)
            with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                comparing = CompareTab(ctx)
            with gr.Tab("Playground", id="playground", elem_id="tab-playground"):
                playground = PlaygroundTab(ctx)
            with gr.Tab("Studies", id="studies", elem_id="tab-studies"):
                studying = StudiesTab(ctx)
            with gr.Tab("Benchmarks", id="benchmarks", elem_id="tab-benchmarks"):
                benchmarks = BenchmarksTab(ctx)
        with gr.Accordion("API keys", open=False, elem_id="keys-accordion"):
            keys = KeysPanel(ctx)
        timer = gr.Timer(POLL_S)
        launch.wire(demo, runs.run_id)
        runs.wire(demo, timer, selected_store)
        runs.wire_clone(launch, tabs)
        comparing.wire(demo)
        playground.wire(demo)
        studying.wire(demo, tabs, comparing.runs)
        benchmarks.wire(demo)
        keys.wire(demo)
    return demo


__all__ = ["build_ui"]
