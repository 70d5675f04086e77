"""What a packed run's process holds beyond its estimate, measured (docs/packing.md).

A packing worker (workers/packing.py) budgets each run on a CPU worker as its
resident memory above the process's baseline (the RSS when `prepare_run` returns,
less the model's tensors) against a cap of estimate x (1 + margin) + a fixed runtime
allowance, and reserves the baseline beside it. This script measures both figures on
real runs, each in a fresh interpreter as `workers.run_child` starts them:

- baseline: the interpreter with torch, transformers and the engine imported, the
  tokenizer, the tokenized data, loading's leftovers (`prepare_run` as the child calls it);
- peak above baseline: sampled every 20 ms through the whole of `engine.train.train`
  (training steps, the final evaluation with its generations, saving nothing);
- residual: peak above baseline - the run's CPU estimate (`estimate_run(device='cpu')`):
  what no row of the estimate shows (libraries' lazy set-up on the first step, oneDNN
  and allocator caches, evaluation batches, generation's KV cache and logits).

    .venv/bin/python bench/run_process_memory.py          # writes bench/RESULTS-run-process.md

workers.packing.RUN_SLACK_BYTES and CPU_PROCESS_MB are set from these figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MiB = 1 << 20

# the packing tests' runs (tests/test_worker_packing.py) and a bundled LLM's
RUNS = {
    "tiny-llama lora": {"model": "tiny-llama", "task": "causal_lm",
                        "dataset": {"name": "demo-instruct", "max_rows": 100},
                        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
                        "training": {"max_steps": 12, "batch_size": 8, "max_seq_len": 32, "eval_every": 0}},
    "tiny-bert lora": {"model": "tiny-bert", "task": "classification",
                       "dataset": {"name": "demo-sentiment", "max_rows": 100},
                       "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
                       "training": {"max_steps": 12, "batch_size": 8, "max_seq_len": 32, "eval_every": 0}},
    "smollm2-135m lora": {"model": "smollm2-135m", "task": "causal_lm",
                          "dataset": {"name": "demo-instruct", "max_rows": 64},
                          "method": {"name": "lora", "r": 8},
                          "training": {"max_steps": 4, "batch_size": 4, "max_seq_len": 128, "eval_every": 0,
                                       "eval_max_rows": 16}},
}


def child(config: dict) -> dict:
    """One run in this process, as workers.run_child trains it; the figures in bytes."""
    import engine.prepare as prepare
    from engine.config import parse_run_config
    from engine.estimator import estimate_run
    from engine.train import train
    from workers.run_child import own_rss, tensor_bytes

    cfg = parse_run_config({"name": "measure", **config})
    state = {"baseline": None, "peak": 0, "steps_peak": 0}
    training = [True]

    def sample():
        while True:
            if state["baseline"] is not None:
                used = own_rss() - state["baseline"]
                state["peak"] = max(state["peak"], used)
                if training[0]:
                    state["steps_peak"] = max(state["steps_peak"], used)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    prep = prepare.prepare_run(cfg)
    tensors = tensor_bytes(prep.model)
    state["baseline"] = own_rss() - tensors
    total = cfg.training.max_steps

    def on_step(m):
        if m.step >= total - 1:          # the last step's callback comes after the final evaluation
            training[0] = False

    train(prep, on_step=on_step)
    time.sleep(0.1)
    est = estimate_run(cfg, cfg.model, device="cpu").total
    return {"baseline": state["baseline"], "tensors": tensors, "peak": state["peak"],
            "steps_peak": state["steps_peak"], "estimate": est}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
        return 0
    from stamp import Stamp

    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(RUNS)
    st = Stamp("bench/run_process_memory.py")
    print(st.header(), flush=True)
    st.say("Each run in a fresh interpreter (`python bench/run_process_memory.py --child CONFIG`), trained by "
           "`engine.train.train` after `engine.prepare.prepare_run`, as `workers.run_child` does; resident memory "
           "(VmRSS) sampled every 20 ms. MiB.")
    st.say()
    st.say("| run | baseline | model tensors | peak above baseline (steps) | peak above baseline (whole run) | "
           "CPU estimate | residual (peak - estimate) |")
    st.say("|---|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for name in names:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(RUNS[name])], capture_output=True,
                             text=True, cwd=REPO)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            st.say(f"| {name} | failed: {out.stderr.strip().splitlines()[-1][:200] if out.stderr else out.returncode} "
                   f"||||||")
            continue
        r = {k: v / MiB for k, v in json.loads(line[7:]).items()}
        worst = max(worst, r["peak"] - r["estimate"])
        st.say(f"| {name} | {r['baseline']:.0f} | {r['tensors']:.1f} | {r['steps_peak']:.1f} | {r['peak']:.1f} | "
               f"{r['estimate']:.1f} | {r['peak'] - r['estimate']:.1f} |")
        print(st.lines[-1], flush=True)
    st.say()
    st.say(f"Largest residual: {worst:.0f} MiB.")
    print("wrote", st.write("run-process", title="A run process's memory beyond its estimate (CPU)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
