"""How close is the memory estimator to what our training loop really saves?

For every registered method (engine.methods.METHODS, read at run time) on both
bundled models, this measures the activations of one real forward of our
training loop (engine.measure: saved-for-backward tensors, deduplicated by
storage, parameters excluded, plus the largest chunk of fp32 logits our
chunked cross-entropy holds at once) and sets the `model` and `appendix` formulas beside it.

    .venv/bin/python bench/estimator_accuracy.py            # seq {128, 512, 1024} x batch {1, 4}
    .venv/bin/python bench/estimator_accuracy.py --quick    # seq 128 x batch {1, 4}

MiniLM has 512 positions: its sequences stop at 512. Prints a table and writes
bench/RESULTS-estimator.md. Also times an estimate for a 70B config (no weights
loaded, no model instantiated).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from stamp import Stamp  # noqa: E402

from engine.estimator import clear_estimate_cache, estimate  # noqa: E402
from engine.measure import measure  # noqa: E402
from engine.methods import METHODS  # noqa: E402

MiB = 1 << 20
MODELS = {"smollm2-135m": "causal_lm", "minilm": "classification"}
TARGET = 10.0   # percent


def timing_70b(n: int = 50) -> dict:
    """Median wall time of an uncached estimate() for llama-2-70b and llama-3-70b (LoRA r=8)."""
    out = {}
    for name in ("llama-2-70b", "llama-3-70b"):
        estimate(name, {"name": "lora", "r": 8}, batch_size=1, seq_len=4096, dtype="bf16")
        times = []
        for _ in range(n):
            clear_estimate_cache()
            t0 = time.perf_counter()
            estimate(name, {"name": "lora", "r": 8}, batch_size=1, seq_len=4096, dtype="bf16")
            times.append(time.perf_counter() - t0)
        times.sort()
        out[name] = times[len(times) // 2] * 1000
    return out


def run(models: list[str], methods: list[str], shapes: list[tuple[int, int]], verbose: bool) -> list[dict]:
    from engine.models import load_model

    rows = []
    for model in models:
        task = MODELS[model]
        loaded = load_model(model, task)
        max_pos = loaded.model.config.max_position_embeddings
        for name in methods:
            method = {"name": name}
            for seq, batch in shapes:
                if seq > max_pos:
                    continue
                if True:
                    row = {"model": model, "method": name, "seq": seq, "batch": batch}
                    try:
                        t0 = time.perf_counter()
                        m = measure(model, method, batch_size=batch, seq_len=seq, task=task, loaded=loaded,
                                    backward=False)
                        row["seconds"] = time.perf_counter() - t0
                        row["measured"] = m.rows["hidden_states"]
                        row["model_est"] = estimate(model, method, batch_size=batch, seq_len=seq, task=task,
                                                    device="cpu").rows["hidden_states"]
                        row["appendix"] = estimate(model, method, batch_size=batch, seq_len=seq, task=task,
                                                   formula="appendix").rows["hidden_states"]
                        row["model_err"] = 100 * (row["model_est"] / row["measured"] - 1)
                        row["appendix_err"] = 100 * (row["appendix"] / row["measured"] - 1)
                    except Exception as e:     # a method that cannot run on this architecture, etc.
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
                    if verbose:
                        print(fmt_row(row), flush=True)
                    gc.collect()
        del loaded
        gc.collect()
    return rows


def fmt_row(r: dict) -> str:
    head = f"{r['model']:<13} {r['method']:<17} {r['seq']:>5} {r['batch']:>3}"
    if "error" in r:
        return f"{head}  n/a: {r['error']}"
    ok = "ok" if abs(r["model_err"]) <= TARGET else "MISS"
    return (f"{head} {r['measured'] / MiB:10.1f} {r['model_est'] / MiB:10.1f} {r['model_err']:+7.1f}% {ok:<4} "
            f"{r['appendix'] / MiB:10.1f} {r['appendix_err']:+7.1f}%")


HEADER = (f"{'model':<13} {'method':<17} {'seq':>5} {'bs':>3} {'measured':>10} {'model':>10} {'err':>8} {'':<4} "
          f"{'appendix':>10} {'err':>8}   (MiB)")


def markdown(rows: list[dict], timing: dict, args, seconds: float) -> str:
    ok = [r for r in rows if "error" not in r]
    within = sum(abs(r["model_err"]) <= TARGET for r in ok)
    worst = max(ok, key=lambda r: abs(r["model_err"])) if ok else None
    app = [r["appendix_err"] for r in ok]
    lines = [
        f"Arguments: `{' '.join(args.argv) or '(none)'}`; {seconds:.0f} s.",
        "",
        "Measured = bytes of the tensors autograd saves during one forward of our training loop "
        "(`engine.train.compute_loss`), deduplicated by storage, parameters excluded, plus the largest "
        "chunk of fp32 logits our chunked cross-entropy holds at once (`engine.measure`). fp32, SDPA attention, "
        "every method with its default config (LoRA family on the architecture's default targets), "
        "full (unpadded) random batches. Estimates use `device='cpu'` (CPU dropout masks are fp32 and CPU SDPA "
        "under dropout falls back to the math kernel, as on the machine that measured).",
        "",
        f"Result: `model` within ±{TARGET:.0f}% in {within} of {len(ok)} cases"
        + (f" (worst {worst['model_err']:+.1f}%: {worst['method']} on {worst['model']}, seq {worst['seq']}, "
           f"batch {worst['batch']})" if worst else "")
        + (f"; `appendix` {min(app):+.0f}% … {max(app):+.0f}%." if app else "."),
        "",
        f"Estimate time (no weights, no model instantiated): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in timing.items()) + " (median of 50).",
        "",
        "Shapes (seq x batch): " + ", ".join(f"{s_}x{b_}" for s_, b_ in args.shape_list)
        + ". MiniLM has 512 positions, so its sequences stop at 512.",
        "",
        "| model | method | seq | batch | measured MiB | model MiB | model err | appendix MiB | appendix err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['seq']} | {r['batch']} | n/a | | | | {r['error']} |")
        else:
            lines.append(f"| {r['model']} | {r['method']} | {r['seq']} | {r['batch']} | {r['measured'] / MiB:.1f} | "
                         f"{r['model_est'] / MiB:.1f} | {r['model_err']:+.1f}% | {r['appendix'] / MiB:.1f} | "
                         f"{r['appendix_err']:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="seq 128 only (batch 1 and 4)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--methods", default="", help="comma-separated subset (default: every registered method)")
    ap.add_argument("--seqs", default="", help="override, e.g. 128,512")
    ap.add_argument("--batches", default="", help="override, e.g. 1,4")
    ap.add_argument("--shapes", default="", help="explicit seq x batch list, e.g. 128x1,128x4,1024x1")
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-estimator.md")))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    st = Stamp("bench/estimator_accuracy.py")
    print(st.header(), flush=True)
    seqs = [int(s) for s in args.seqs.split(",")] if args.seqs else ([128] if args.quick else [128, 512, 1024])
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 4]
    shapes = [(s, b) for s in seqs for b in batches]
    if args.shapes:
        shapes = [tuple(int(x) for x in item.split("x")) for item in args.shapes.split(",")]
    args.shape_list = shapes
    methods = args.methods.split(",") if args.methods else list(METHODS)
    models = args.models.split(",")
    t0 = time.perf_counter()
    timing = timing_70b()
    print("estimate() time:", ", ".join(f"{k} {v:.2f} ms" for k, v in timing.items()))
    print(HEADER)
    rows = run(models, methods, shapes, verbose=True)
    seconds = time.perf_counter() - t0
    ok = [r for r in rows if "error" not in r]
    within = sum(abs(r["model_err"]) <= TARGET for r in ok)
    print(f"model within ±{TARGET:.0f}%: {within}/{len(ok)}")
    if not args.no_write:
        out = st.write("estimator", markdown(rows, timing, args, seconds),
                       title="Estimator accuracy: `model` and `appendix` formulas vs. measured activations",
                       path=Path(args.out))
        print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
