"""8-bit AdamW against fp32 AdamW on SmolLM2-135M: LoRA and full fine-tuning.

The same run (data, seed, schedule) with `training.optimizer: adamw` and
`adamw_8bit` (engine.optim; Dettmers et al. 2022, arXiv:2110.02861). Reported per
case: the final loss (mean of the last 5 steps) of each and their ratio (target
<= 1.01), the optimizer-state bytes measured on the optimizer object after a step
over the run's trainable parameters and their ratio (target <= 0.3), and the median
step time after the first 2 steps.

    .venv/bin/python bench/optimizers.py [--steps 200] [--cases lora,full]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from stamp import Stamp  # noqa: E402

from engine.config import parse_run_config  # noqa: E402
from engine.optim import make_optimizer, state_nbytes  # noqa: E402
from engine.prepare import prepare_run  # noqa: E402
from engine.train import train  # noqa: E402

CASES = {
    "lora": ({"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}, 1e-3),
    "full": ({"name": "full"}, 5e-5),
}


def run(method: dict, lr: float, optimizer: str, steps: int, seq: int, batch: int) -> dict:
    cfg = parse_run_config({
        "name": f"bench-{method['name']}-{optimizer}", "model": "smollm2-135m", "task": "causal_lm",
        "dataset": {"name": "demo-instruct"}, "method": method,
        "training": {"max_steps": steps, "batch_size": batch, "learning_rate": lr, "max_seq_len": seq,
                     "eval_every": 0, "eval_batches": 1, "precision": "fp32", "warmup_steps": min(10, steps // 10),
                     "optimizer": optimizer}})
    prep = prepare_run(cfg)
    res = train(prep)
    losses = [h["loss"] for h in res.history]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(res.history, res.history[1:])][1:]
    params = [p for p in prep.model.parameters() if p.requires_grad]     # state bytes on the optimizer object
    opt = make_optimizer(optimizer, params, lr=lr)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return {"final": statistics.fmean(losses[-5:]), "last": losses[-1], "state": state_nbytes(opt),
            "step_s": statistics.median(times) if times else float("nan"), "n_trainable": res.n_trainable}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cases", default="lora,full")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS-optimizers.md")
    a = ap.parse_args()
    st = Stamp("bench/optimizers.py")
    print(st.header())
    st.say(f"smollm2-135m causal LM on demo-instruct, {a.steps} steps, batch {a.batch} x {a.seq} tokens, fp32, "
           f"{torch.get_num_threads()} threads, linear schedule; final loss = mean of the last 5 steps")
    st.say()
    st.say("| case | trainable | final loss adamw | final loss 8-bit | ratio (<= 1.01) | state adamw | "
          "state 8-bit | ratio (<= 0.3) | step adamw (s) | step 8-bit (s) |")
    st.say("|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for case in a.cases.split(","):
        method, lr = CASES[case]
        ref = run(method, lr, "adamw", a.steps, a.seq, a.batch)
        q8 = run(method, lr, "adamw_8bit", a.steps, a.seq, a.batch)
        lr_ratio, st_ratio = q8["final"] / ref["final"], q8["state"] / ref["state"]
        ok &= lr_ratio <= 1.01 and st_ratio <= 0.3
        st.say(f"| {case} | {ref['n_trainable']:,} | {ref['final']:.4f} | {q8['final']:.4f} | {lr_ratio:.4f} | "
              f"{ref['state'] / 1e6:.2f} MB | {q8['state'] / 1e6:.2f} MB | {st_ratio:.3f} | {ref['step_s']:.3f} | "
              f"{q8['step_s']:.3f} |")
    st.say()
    st.say(f"Targets {'met' if ok else 'NOT met'}.")
    if not a.no_write:
        print("wrote", st.write("optimizers", title="8-bit AdamW vs fp32 AdamW"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
