"""The Playground tab: a finished run's base model and adapted model side by
side on the same input (label probabilities, or greedy generation)."""

from __future__ import annotations

import gradio as gr

from .. import compare, service
from .common import Ctx, error_text, run_choices


class PlaygroundTab:
    """The Playground tab's components (built inside the current gr.Tab) and its events."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        with gr.Row():
            self.run = gr.Dropdown([], label="Finished run", elem_id="pg-run", scale=3)
            self.tokens = gr.Slider(1, 128, value=32, step=1, label="new tokens (causal LM)", elem_id="pg-tokens",
                                    scale=2)
            self.refresh = gr.Button("Refresh", elem_id="pg-refresh", scale=1)
        self.text = gr.Textbox(label="Text / prompt", lines=3, elem_id="pg-text",
                               placeholder="a film that stays with you long after it ends")
        self.go = gr.Button("Run base and adapter", variant="primary", elem_id="pg-go")
        self.msg = gr.Markdown(elem_id="pg-msg")
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Base model**")
                self.base_label = gr.Label(num_top_classes=5, label="base", elem_id="pg-base-label")
                self.base_text = gr.Textbox(label="base", lines=6, visible=False, elem_id="pg-base-text")
            with gr.Column():
                gr.Markdown("**With the adapter**")
                self.ad_label = gr.Label(num_top_classes=5, label="adapter", elem_id="pg-adapter-label")
                self.ad_text = gr.Textbox(label="adapter", lines=6, visible=False, elem_id="pg-adapter-text")

    def shown(self, res: dict) -> dict:
        """Labels for classification, text boxes for generation; the other pair hidden."""
        cls = res["task"] == "classification"
        on, off = ((self.base_label, self.ad_label), (self.base_text, self.ad_text)) if cls else \
            ((self.base_text, self.ad_text), (self.base_label, self.ad_label))
        return {on[0]: gr.update(value=res["base"], visible=True), on[1]: gr.update(value=res["adapted"], visible=True),
                off[0]: gr.update(visible=False), off[1]: gr.update(visible=False)}

    def wire(self, demo: gr.Blocks) -> None:
        ctx = self.ctx

        def choices(request: gr.Request = None):
            ch = run_choices(ctx.visible_runs(request, status="succeeded"))
            return gr.update(choices=ch, value=ch[0] if ch else None)
        self.refresh.click(choices, None, self.run)
        demo.load(choices, None, self.run)

        def on_try(sel, text, n_tokens, request: gr.Request = None):
            from .. import playground
            ids = compare.parse_run_ids([sel] if sel else [])
            if not ids:
                return {self.msg: "Pick a finished run first."}
            try:
                ctx.visible_run(ids[0], request)
                res = playground.try_run(ctx.settings, ids[0], text, int(n_tokens))
            except service.NotFound as e:
                return {self.msg: error_text(e)}
            except (ValueError, LookupError) as e:
                return {self.msg: f"✗ {e}"}
            except Exception as e:
                return {self.msg: f"✗ {type(e).__name__}: {e}"}
            kind = "classification" if res["task"] == "classification" else "causal LM, greedy"
            return {self.msg: f"Run {ids[0]} · {kind}", **self.shown(res)}
        self.go.click(on_try, [self.run, self.text, self.tokens],
                      [self.msg, self.base_label, self.base_text, self.ad_label, self.ad_text])
