"""How long the evaluations of the Launch form's default runs take on a CPU, next to their
training: the final evaluation should stay near a tenth of the training time (#24). The
default bounds (engine.phases.eval_rows_bound: a sixth of the rows trained on, at least 32;
training.eval_generate 8 answers of at most eval_generate_tokens 32 tokens) are what is
measured. Times come from the phases the training loop reports (engine.phases): training
is the loop's time outside evaluations. Writes bench/RESULTS-eval-budget.md.

    python bench/eval_budget.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from stamp import Stamp  # noqa: E402

CASES = {   # the Launch form's first values for each bundled model (the config's defaults otherwise)
    "minilm": {"model": "minilm", "task": "classification", "dataset": {"name": "demo-sentiment"},
               "method": {"name": "lora", "r": 8, "target_modules": ["query", "value"]},
               "training": {"max_steps": 60}},
    # 30 steps, not the form's 60: the rows scored grow with the steps, the answers do not, so the
    # ratio at 30 steps bounds the one at 60 (and a CPU takes minutes per SmolLM2 run)
    "smollm2-135m": {"model": "smollm2-135m", "task": "causal_lm", "dataset": {"name": "demo-instruct"},
                     "method": {"name": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]},
                     "training": {"max_steps": 30}},
}


def measure(body: dict) -> dict:
    from engine.config import parse_run_config
    from engine.prepare import prepare_run
    from engine.train import train

    cfg = parse_run_config({"name": body["model"], **body})
    prep = prepare_run(cfg)
    events: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    res = train(prep, on_phase=lambda text: events.append((time.perf_counter(), text.split(":")[0])))
    end = time.perf_counter()
    evals, start = [], None
    for (t, kind) in events + [(end, "end")]:
        if kind.startswith("evaluating") and start is None:
            start = t
        elif not kind.startswith("evaluating") and start is not None:
            evals.append(t - start)
            start = None
    loop = end - t0
    return {"steps": res.steps, "loop_s": loop, "evals": evals, "train_s": loop - sum(evals),
            "eval_rows": res.eval.get("eval_rows"), "gen_rows": res.eval.get("gen_rows"),
            "metric": {k: v for k, v in res.eval.items() if k in ("accuracy", "eval_loss", "rouge_l")},
            "lr": cfg.training.learning_rate, "batch": cfg.training.batch_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", default=",".join(CASES))
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    st = Stamp("bench/eval_budget.py")
    st.say(f"The Launch form's defaults per bundled model (LoRA r=8, batch 8, max_seq_len 64, eval "
           f"every 10, the method's default learning rate), fp32 on CPU, {torch.get_num_threads()} torch "
           f"thread(s). train s: the training loop outside evaluations; final eval s: the last evaluation "
           f"(validation rows, then the generated answers for causal LM); target: final / train <= ~0.10.")
    st.say("")
    st.say("| model | steps | rows scored | answers | train s | evaluations s | final eval s | final / train | metrics |")
    st.say("|---|---|---|---|---|---|---|---|---|")
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        r = measure(CASES[name])
        ev = ", ".join(f"{x:.1f}" for x in r["evals"])
        metric = ", ".join(f"{k} {v:.4f}" for k, v in r["metric"].items())
        st.say(f"| {name} | {r['steps']} | {r['eval_rows']} | {r['gen_rows'] or 0} | {r['train_s']:.1f} | {ev} | "
               f"{r['evals'][-1]:.1f} | {r['evals'][-1] / r['train_s']:.3f} | {metric} |")
    st.write("eval-budget", title="Evaluation time of the default runs on a CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
