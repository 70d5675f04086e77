"""The Playground tab: one prompt through the base model and any number of finished
runs on it, side by side (studio.playground). Causal LM columns fill token by
token (a Gradio generator); classification columns show each model's label
probabilities. Runs of different bases are refused with the reason in #pg-msg.

Stable element ids for tests: #pg-run (multiselect), #pg-refresh, #pg-text,
#pg-temperature, #pg-top-p, #pg-tokens, #pg-seed, #pg-go, #pg-msg, and per column
i (0 = the base, then the runs in the order chosen) #pg-col-i, #pg-out-i (text),
#pg-probs-i (probabilities)."""

from __future__ import annotations

import time

import gradio as gr

from .. import compare, service
from .common import Ctx, error_text

SLOTS = 9                 # the base and up to studio.playground.MAX_RUNS runs
STREAM_EVERY_S = 0.1      # at most this often a streamed update goes to the browser


def run_label(run: dict) -> str:
    return f"#{run['id']} {run['name']} ({run['method']}, {run['model']}, {run['task']})"


# The example shown in the text box: the Launch form's default run (MiniLM + LoRA, 30 steps, its default
# rate, seed 0) calls it positive with p 0.99, where the base model (an untrained head) is at a coin flip;
# the old one ("a film that stays with you long after it ends") came out 0.54 positive (#24).
EXAMPLE = "a wonderful film: great acting and a story I loved"

class PlaygroundTab:
    """The Playground tab's components (built inside the current gr.Tab) and its events."""

    def __init__(self, ctx: Ctx):
        from .. import playground as pg

        self.ctx = ctx
        with gr.Row():
            self.run = gr.Dropdown([], multiselect=True, label="Finished runs on one base model",
                                   elem_id="pg-run", scale=4)
            self.refresh = gr.Button("Refresh", elem_id="pg-refresh", scale=1)
        self.text = gr.Textbox(label="Text / prompt", lines=3, elem_id="pg-text",
                               placeholder=EXAMPLE)
        with gr.Row():
            self.temperature = gr.Slider(0, 2, value=0, step=0.05, label="temperature (0: greedy)",
                                         elem_id="pg-temperature")
            self.top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="top-p", elem_id="pg-top-p")
            self.tokens = gr.Slider(1, pg.MAX_NEW_TOKENS, value=pg.DEFAULT_NEW_TOKENS, step=1,
                                    label="max new tokens", elem_id="pg-tokens")
            self.seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="pg-seed")
        self.go = gr.Button("Run base and adapters", variant="primary", elem_id="pg-go")
        self.msg = gr.Markdown(elem_id="pg-msg")
        self.cols, self.outs, self.probs = [], [], []
        with gr.Row(equal_height=False):
            for i in range(SLOTS):
                with gr.Column(visible=False, min_width=260, elem_id=f"pg-col-{i}") as col:
                    self.outs.append(gr.Textbox(label="base" if i == 0 else f"run {i}", lines=8, interactive=False,
                                                elem_id=f"pg-out-{i}"))
                    self.probs.append(gr.Label(num_top_classes=10, label="probabilities", visible=False,
                                               elem_id=f"pg-probs-{i}"))
                self.cols.append(col)

    @property
    def outputs(self) -> list:
        return [self.msg, *self.cols, *self.outs, *self.probs]

    def layout(self, titles: list[str], classification: bool) -> dict:
        """Show one column per title (text or probabilities), hide the rest."""
        up = {}
        for i in range(SLOTS):
            on = i < len(titles)
            up[self.cols[i]] = gr.update(visible=on)
            if on:
                up[self.outs[i]] = gr.update(label=titles[i], value="", visible=not classification)
                up[self.probs[i]] = gr.update(label=titles[i], value=None, visible=classification)
        return up

    def wire(self, demo: gr.Blocks) -> None:
        ctx = self.ctx

        def choices(request: gr.Request = None):
            runs = ctx.visible_runs(request, status="succeeded")
            return gr.update(choices=[run_label(r) for r in runs])
        self.refresh.click(choices, None, self.run)
        demo.load(choices, None, self.run)

        def on_go(sel, text, temperature, top_p, n_tokens, seed, request: gr.Request = None):
            from .. import playground as pg
            ids = compare.parse_run_ids(sel or [])
            if not ids:
                yield {self.msg: "Pick one or more finished runs first.", **self.layout([], False)}
                return
            try:
                runs = [ctx.visible_run(rid, request) for rid in ids]
                prompt = pg.check_prompt(text)
                gen = pg.check_settings(int(n_tokens), float(temperature), float(top_p),
                                        None if seed is None else int(seed))
                session = pg.open_session(ctx.settings, runs)
            except service.NotFound as e:
                yield {self.msg: error_text(e), **self.layout([], False)}
                return
            except (ValueError, LookupError) as e:
                yield {self.msg: f"✗ {e}", **self.layout([], False)}
                return
            except Exception as e:   # the store, a broken adapter bank: say so where the answer would be
                yield {self.msg: f"✗ {type(e).__name__}: {e}", **self.layout([], False)}
                return
            titles = [c.title for c in session.columns]
            where = f"base + {len(runs)} run{'s' if len(runs) > 1 else ''} on {session.key[0]}"
            if session.task == "classification":
                outs = pg.classify_many(session, prompt)
                up = self.layout(titles, True)
                for i, o in enumerate(outs):
                    up[self.probs[i]] = gr.update(label=titles[i], value=o["probabilities"], visible=True)
                yield {self.msg: f"classification · {where}", **up}
                return
            mode = "greedy" if gen.temperature == 0 else f"temperature {gen.temperature:g}, top-p {gen.top_p:g}"
            yield {self.msg: f"causal LM, {mode}, seed {gen.seed} · {where} · generating…",
                   **self.layout(titles, False)}
            index = {c.run_id: i for i, c in enumerate(session.columns)}
            texts = [""] * len(titles)
            last = time.monotonic()
            for ev in pg.stream_columns(session, prompt, gen):
                if "token" not in ev:
                    continue
                texts[index[ev["run_id"]]] += ev["token"]
                if time.monotonic() - last >= STREAM_EVERY_S:
                    last = time.monotonic()
                    yield {self.outs[i]: t for i, t in enumerate(texts)}
            done = {self.outs[i]: t for i, t in enumerate(texts)}
            yield {self.msg: f"causal LM, {mode}, seed {gen.seed} · {where}", **done}
        self.go.click(on_go, [self.run, self.text, self.temperature, self.top_p, self.tokens, self.seed],
                      self.outputs)
