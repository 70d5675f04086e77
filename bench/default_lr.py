"""Measure the Launch defaults: for each method, train the first run a newcomer launches
(MiniLM on demo-sentiment, the Launch form's steps, batch and sequence length) at a few
learning rates and report the validation accuracy at the end and the training time.
The best rate of each method is what its MethodSpec.default_lr should say
(engine/methods/<method>.py); the table is written to bench/RESULTS-default-lr.md.

    python bench/default_lr.py                      # every method
    python bench/default_lr.py --methods lora,ia3   # some
    python bench/default_lr.py --methods lora --steps 60 --seeds 0,1,2 --lrs 0.003,0.005,0.01
                                                    # fixed rates, several seeds: mean and worst accuracy
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

# Rates tried by method family (a prompt's virtual tokens want larger steps, whole weights smaller ones).
GRIDS = {
    "prompt": [1e-2, 3e-2, 1e-1],
    "whole": [1e-4, 3e-4, 1e-3],
    "other": [1e-3, 3e-3, 1e-2],
}

LADDER = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]   # the rates a sweep may climb to


def grid_for(spec) -> list[float]:
    if spec.family == "prompt":
        return GRIDS["prompt"]
    if spec.trains_base_weights:
        return GRIDS["whole"]
    return GRIDS["other"]


def one_run(method: str, lr: float, steps: int, batch: int, seq: int, seed: int, examples=None):
    from engine.config import parse_run_config
    from engine.prepare import prepare_run
    from engine.train import train

    cfg = parse_run_config({
        "name": f"{method}-{lr:g}", "model": "minilm", "task": "classification",
        "dataset": {"name": "demo-sentiment"}, "method": {"name": method},
        "training": {"max_steps": steps, "batch_size": batch, "learning_rate": lr, "max_seq_len": seq,
                     "eval_every": 0, "seed": seed}})
    t0 = time.perf_counter()
    prep = prepare_run(cfg, examples=examples)
    res = train(prep)
    return {"accuracy": res.eval.get("accuracy"), "eval_loss": res.eval.get("eval_loss"),
            "loss": res.final_loss, "train_s": res.duration_s, "total_s": time.perf_counter() - t0,
            "examples": prep.examples}


def seeds_table(st, a, methods) -> int:
    """Each method at each of --lrs with each of --seeds: is the rate good whatever the seed?"""
    seeds = [int(x) for x in a.seeds.split(",")]
    st.say(f"Seeds {', '.join(map(str, seeds))} (the seed draws the head's and the adapter's initial weights "
           f"and the batch order; the validation rows are fixed).")
    st.say("")
    st.say("| method | learning rate | " + " | ".join(f"accuracy seed {s}" for s in seeds) + " | mean | worst |")
    st.say("|---|---|" + "---|" * (len(seeds) + 2))
    for name in [m.strip() for m in a.methods.split(",") if m.strip()]:
        lrs = [float(x) for x in a.lrs.split(",")] if a.lrs else grid_for(methods[name])
        for lr in lrs:
            accs = [one_run(name, lr, a.steps, a.batch, a.seq, s)["accuracy"] for s in seeds]
            st.say(f"| {name} | {lr:g} | " + " | ".join(f"{x:.4f}" for x in accs) +
                   f" | {sum(accs) / len(accs):.4f} | {min(accs):.4f} |")
    st.write("default-lr-seeds", title="Learning rates across seeds", path=Path(a.out) if a.out else None)
    return 0


def main(argv=None) -> int:
    from engine.methods import METHODS

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="", help="several seeds (then --lrs): each rate's mean and worst accuracy")
    p.add_argument("--lrs", default="", help="the rates to try (default: the method family's grid, climbing)")
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    st = Stamp("bench/default_lr.py")
    st.say(f"MiniLM (bundled) + each method on demo-sentiment (300 validation rows, all scored at the end), "
           f"{a.steps} steps, batch {a.batch}, max_seq_len {a.seq}, seed {a.seed}, linear schedule, fp32, "
           f"{torch.get_num_threads()} torch thread(s). Accuracy after the last step; train s = the training "
           f"loop with its final evaluation. Best = the highest accuracy (the lower rate on a tie).")
    if a.seeds:
        return seeds_table(st, a, METHODS)
    st.say("")
    st.say("| method | learning rate | accuracy | eval loss | final train loss | train s |")
    st.say("|---|---|---|---|---|---|")
    best: dict[str, tuple[float, float]] = {}
    examples = None
    for name in [m.strip() for m in a.methods.split(",") if m.strip()]:
        spec = METHODS[name]
        grid = list(grid_for(spec))
        i = 0
        while i < len(grid):
            lr = grid[i]
            try:
                r = one_run(name, lr, a.steps, a.batch, a.seq, a.seed, examples)
            except Exception as e:   # a method that cannot run on MiniLM: said, not hidden
                st.say(f"| {name} | {lr:g} | failed: {type(e).__name__}: {str(e)[:80]} | | | |")
                break
            examples = r["examples"]
            st.say(f"| {name} | {lr:g} | {r['accuracy']:.4f} | {r['eval_loss']:.4f} | {r['loss']:.4f} | "
                   f"{r['train_s']:.1f} |")
            if name not in best or r["accuracy"] > best[name][1] + 1e-9:
                best[name] = (lr, r["accuracy"])
            # the best so far is the largest rate tried: try the next rung of the ladder
            higher = [x for x in LADDER if x > lr * 1.01]
            if i == len(grid) - 1 and best[name][0] == lr and higher:
                grid.append(higher[0])
            i += 1
        if a.out:   # after each method: a long sweep that is stopped keeps what it measured
            st.write("default-lr", title="Per-method default learning rates (Launch defaults), partial",
                     path=Path(a.out))
    st.say("")
    st.say("Best rate per method (MethodSpec.default_lr):")
    st.say("")
    st.say("| method | best learning rate | accuracy | default_lr in the spec |")
    st.say("|---|---|---|---|")
    for name, (lr, acc) in best.items():
        st.say(f"| {name} | {lr:g} | {acc:.4f} | {getattr(METHODS[name], 'default_lr', None)} |")
    if a.out:
        st.write("default-lr", title="Per-method default learning rates (Launch defaults)", path=Path(a.out))
    else:
        st.write("default-lr", title="Per-method default learning rates (Launch defaults)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
