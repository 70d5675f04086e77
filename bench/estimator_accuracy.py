"""How close is the memory estimator to what our training loop really holds?

For every registered method (engine.methods.METHODS, read at run time) on both
bundled models, on CPU in fp32, with the estimator's `device='cpu'` (no CUDA
context):

- hidden_states: the activations of one real forward of our training loop
  (engine.measure: saved-for-backward tensors, deduplicated by storage,
  parameters excluded, plus the largest chunk of fp32 logits our chunked
  cross-entropy holds at once), beside the `model` and `appendix` formulas;
- weights, gradients, optimizer: one real training step (engine.measure.step_peak:
  task loss + the method's extra loss, backward, gradient clipping, the run's
  AdamW from engine.optim, step) and the bytes of the real tensors: parameters,
  their .grad after backward, the optimizer's state after step();
- total: the same step's peak of live bytes in torch's CPU allocator (the
  profiler's memory records summed in time order, on top of the weights and
  buffers live before the step; the CPU analogue of CUDA's
  max_memory_allocated, not RSS) beside the estimate's total.

    .venv/bin/python bench/estimator_accuracy.py            # seq {128, 512, 1024} x batch {1, 4}; a step at each
    .venv/bin/python bench/estimator_accuracy.py --quick    # seq 128 x batch {1, 4}; a step at 128 x 4

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
from engine.measure import measure_prepared, prepare_for_measure, step_peak  # noqa: E402
from engine.methods import METHODS, get_method  # noqa: E402

MiB = 1 << 20
MODELS = {"smollm2-135m": "causal_lm", "minilm": "classification"}
TARGET = 10.0   # percent
STEP_ROWS = ("weights", "gradients", "optimizer")


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


def pct(est: int, measured: int) -> float:
    """Signed error of an estimate in percent (0 when both are 0)."""
    if measured == 0:
        return 0.0 if est == 0 else float("inf")
    return 100 * (est / measured - 1)


def run(models: list[str], methods: list[str], shapes: list[tuple[int, int]], step_shapes: set,
        verbose: bool, dtypes: tuple = ("bf16", "fp32")) -> list[dict]:
    from engine.models import load_model

    rows = []
    for model in models:
        task = MODELS[model]
        loaded = load_model(model, task)
        max_pos = loaded.model.config.max_position_embeddings
        for name, dtype in [(n, d) for n in methods for d in dtypes]:
            method = {"name": name}
            for seq, batch in shapes:
                if seq > max_pos:
                    continue
                row = {"model": model, "method": name, "dtype": dtype, "seq": seq, "batch": batch}
                try:
                    t0 = time.perf_counter()
                    # a method that quantizes the base loads it itself, layer by layer (engine.loading)
                    own = get_method(name).quantizes_base and dtype != "fp32"
                    prep = prepare_for_measure(model, method, task=task, loaded=None if own else loaded,
                                               precision=dtype)
                    m = measure_prepared(prep, batch_size=batch, seq_len=seq, backward=False)
                    row["measured"] = m.rows["hidden_states"]
                    est = estimate(model, method, batch_size=batch, seq_len=seq, task=task, device="cpu",
                                   dtype=dtype).rows
                    row["est_rows"] = est
                    row["model_est"] = est["hidden_states"]
                    row["appendix"] = estimate(model, method, batch_size=batch, seq_len=seq, task=task,
                                               formula="appendix", dtype=dtype).rows["hidden_states"]
                    row["model_err"] = pct(row["model_est"], row["measured"])
                    row["appendix_err"] = pct(row["appendix"], row["measured"])
                    if (seq, batch) in step_shapes:
                        sp = step_peak(prep, batch_size=batch, seq_len=seq)
                        row["step"] = {"weights": sp.weights, "gradients": sp.gradients,
                                       "optimizer": sp.optimizer, "peak": sp.peak}
                        for k in STEP_ROWS:
                            row[f"{k}_err"] = pct(est[k], sp.__dict__[k])
                        row["total_err"] = pct(est["total"], sp.peak)
                    del prep
                    row["seconds"] = time.perf_counter() - t0
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
    head = f"{r['model']:<13} {r['method']:<17} {r.get('dtype', 'fp32'):<5} {r['seq']:>5} {r['batch']:>3}"
    if "error" in r:
        return f"{head}  n/a: {r['error']}"
    ok = "ok" if abs(r["model_err"]) <= TARGET else "MISS"
    line = (f"{head} {r['measured'] / MiB:10.1f} {r['model_est'] / MiB:10.1f} {r['model_err']:+7.1f}% {ok:<4} "
            f"{r['appendix'] / MiB:10.1f} {r['appendix_err']:+7.1f}%")
    if "step" in r:
        line += (f" | step: w {r['weights_err']:+.1f}% g {r['gradients_err']:+.1f}% o {r['optimizer_err']:+.1f}% "
                 f"total {r['est_rows']['total'] / MiB:.1f} vs peak {r['step']['peak'] / MiB:.1f} "
                 f"({r['total_err']:+.1f}%)")
    return line


HEADER = (f"{'model':<13} {'method':<17} {'dtype':<5} {'seq':>5} {'bs':>3} {'measured':>10} {'model':>10} {'err':>8} {'':<4} "
          f"{'appendix':>10} {'err':>8}   (MiB)")


def step_summary(rows: list[dict]) -> list[str]:
    """The weights / gradients / optimizer rows and the total against one real step, per dtype."""
    lines = []
    for dtype in sorted({r.get("dtype", "fp32") for r in rows}):
        st = [r for r in rows if "step" in r and r.get("dtype", "fp32") == dtype]
        if not st:
            continue
        lines.append(f"{dtype}:")
        for k in STEP_ROWS + ("hidden_states",):
            errs = [r[f"{k}_err"] if k != "hidden_states" else r["model_err"] for r in st]
            within = sum(abs(e) <= TARGET for e in errs)
            lines.append(f"- `{k}`: within ±{TARGET:.0f}% of the real tensors' bytes in {within} of {len(st)} steps; "
                         f"error {min(errs):+.2f}% … {max(errs):+.2f}%.")
        within = sum(abs(r["total_err"]) <= TARGET for r in st)
        worst = max(st, key=lambda r: abs(r["total_err"]))
        over = sum(r["total_err"] > TARGET for r in st)
        under = sum(r["total_err"] < -TARGET for r in st)
        lines.append(f"- `total` against the step's allocator peak: within ±{TARGET:.0f}% in {within} of {len(st)} "
                     f"steps ({over} above, {under} below; worst {worst['total_err']:+.1f}%: {worst['method']} on "
                     f"{worst['model']}, seq {worst['seq']}, batch {worst['batch']}).")
    return lines or ["No training steps were measured."]


def step_table(rows: list[dict]) -> list[str]:
    lines = ["| model | method | dtype | seq | batch | weights err | gradients err | optimizer err | hidden err | "
             "est. total MiB | measured peak MiB | total err | est. grad+opt MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "step" not in r:
            continue
        e = r["est_rows"]
        lines.append(f"| {r['model']} | {r['method']} | {r['dtype']} | {r['seq']} | {r['batch']} | {r['weights_err']:+.2f}% | "
                     f"{r['gradients_err']:+.2f}% | {r['optimizer_err']:+.2f}% | {r['model_err']:+.1f}% | "
                     f"{e['total'] / MiB:.1f} | {r['step']['peak'] / MiB:.1f} | {r['total_err']:+.1f}% | "
                     f"{(e['gradients'] + e['optimizer']) / MiB:.1f} |")
    return lines


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
        "chunk of fp32 logits our chunked cross-entropy holds at once, with the 16-bit product it is converted from under "
        "autocast (`engine.measure`). Each precision as a run holds it (`training.precision`, docs/precision.md: "
        "bf16 = frozen weights bf16, trainables fp32, autocast; fp32 = everything fp32), SDPA attention, "
        "every method with its default config (LoRA family on the architecture's default targets), "
        "full (unpadded) random batches. Estimates use `device='cpu'` (CPU dropout masks are fp32 and CPU SDPA "
        "under dropout falls back to the math kernel, as on the machine that measured).",
        "",
        f"Result: `model` within ±{TARGET:.0f}% in {within} of {len(ok)} cases"
        + (f" (worst {worst['model_err']:+.1f}%: {worst['method']} {worst['dtype']} on {worst['model']}, seq {worst['seq']}, "
           f"batch {worst['batch']})" if worst else "")
        + (f"; `appendix` {min(app):+.0f}% … {max(app):+.0f}%." if app else "."),
        "",
        "## Every row and the total against one real training step",
        "",
        "For the shapes marked for a step (" + ", ".join(f"{s_}x{b_}" for s_, b_ in sorted(args.step_set))
        + "), the second of two real steps of our training loop per case (`engine.measure.step_peak`: task loss and the "
        "method's extra loss, backward, `clip_grad_norm_(1.0)`, the run's AdamW from `engine.optim`, `step()`), "
        "on CPU. Weights, gradients and optimizer are the bytes of the real tensors (parameters; their "
        "`.grad` after backward; the optimizer's state tensors after `step()`), compared with the estimate for "
        "`device='cpu'` (no CUDA context). The measured peak is the peak of live bytes in torch's CPU allocator "
        "during the step (torch.profiler with `profile_memory=True`: every allocation and free, summed in time "
        "order, deterministic) on top of the weights and buffers live before it: the CPU analogue of CUDA's "
        "`max_memory_allocated`. It leaves out what is allocated outside torch's allocator (oneDNN scratch, "
        "our C kernels' own buffers) and allocator/RSS overheads, so it is not a process RSS figure.",
        "",
        *step_summary(ok),
        "",
        "The measured step is a run's second: the optimizer states the first step made are live through it, "
        "as through every later step. The estimate's total is the step's peak (docs/estimator.md): weights and "
        "optimizer states, plus the larger of the hidden states and the gradients with AdamW's step temporary. "
        "intrinsic_dimension's random-projection buffers (not parameters) are in no row, so its total is below.",
        "",
        *step_table(ok),
        "",
        "## Hidden states against one forward",
        "",
        f"Estimate time (no weights, no model instantiated): "
        + ", ".join(f"{k} {v:.2f} ms" for k, v in timing.items()) + " (median of 50).",
        "",
        "Shapes (seq x batch): " + ", ".join(f"{s_}x{b_}" for s_, b_ in args.shape_list)
        + ". MiniLM has 512 positions, so its sequences stop at 512.",
        "",
        "| model | method | dtype | seq | batch | measured MiB | model MiB | model err | appendix MiB | appendix err |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['dtype']} | {r['seq']} | {r['batch']} | n/a | | | | {r['error']} |")
        else:
            lines.append(f"| {r['model']} | {r['method']} | {r['dtype']} | {r['seq']} | {r['batch']} | {r['measured'] / MiB:.1f} | "
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
    ap.add_argument("--step-shapes", default="",
                    help="seq x batch shapes that also run one training step (default: --quick the largest batch, "
                         "else every shape), e.g. 128x4")
    ap.add_argument("--dtypes", default="bf16,fp32", help="training.precision values to measure (bf16, fp32)")
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
    if args.step_shapes:
        args.step_set = {tuple(int(x) for x in item.split("x")) for item in args.step_shapes.split(",")}
    elif args.quick:
        args.step_set = {(s_, b_) for s_, b_ in shapes if b_ == max(b for _, b in shapes)}
    else:
        args.step_set = set(shapes)
    methods = args.methods.split(",") if args.methods else list(METHODS)
    models = args.models.split(",")
    t0 = time.perf_counter()
    timing = timing_70b()
    print("estimate() time:", ", ".join(f"{k} {v:.2f} ms" for k, v in timing.items()))
    print(HEADER)
    rows = run(models, methods, shapes, args.step_set, verbose=True, dtypes=tuple(args.dtypes.split(",")))
    seconds = time.perf_counter() - t0
    ok = [r for r in rows if "error" not in r]
    within = sum(abs(r["model_err"]) <= TARGET for r in ok)
    print(f"model within ±{TARGET:.0f}%: {within}/{len(ok)}")
    for line in step_summary(ok):
        print(line)
    if not args.no_write:
        out = st.write("estimator", markdown(rows, timing, args, seconds),
                       title="Estimator accuracy: every row and the total vs. one real step on CPU",
                       path=Path(args.out))
        print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
