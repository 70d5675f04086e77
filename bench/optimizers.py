"""8-bit AdamW against fp32 AdamW on SmolLM2-135M: LoRA and full fine-tuning.

The same run (data, seed, schedule) with `training.optimizer: adamw` and
`adamw_8bit` (engine.optim; Dettmers et al. 2022, arXiv:2110.02861). Reported per
case: the final loss (mean of the last 5 steps) of each and their ratio (target
<= 1.01), the optimizer-state bytes measured on the optimizer object after a step
over the run's trainable parameters and their ratio (target <= 0.3), and the median
step time after the first 2 steps.

Each (case, optimizer) training runs in its own child process; `--jobs` of them at
once (default 1), each with `--threads` torch threads. On a shared machine the
four runs side by side finish sooner than one after the other; their step times
are then measured under the same load and compare with each other, not with a
quiet machine. Every child reports its progress every 10 steps on stderr; with `--deadline`, a run
still going is stopped and the file reports the steps it reached.

    .venv/bin/python bench/optimizers.py [--steps 200] [--cases lora,full] [--jobs 4 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
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
                     "eval_every": 0, "eval_batches": 1, "precision": "fp32", "warmup_steps": min(10, steps // 10), "eval_generate": 0,
                     "optimizer": optimizer}})
    prep = prepare_run(cfg)
    t0 = time.perf_counter()

    def progress(m) -> None:
        if m.step % 10 == 0 or m.step == steps:
            print(f"[{method['name']} {optimizer}] step {m.step}/{steps} loss {m.loss:.4f} "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    res = train(prep, on_step=progress)
    losses = [h["loss"] for h in res.history]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(res.history, res.history[1:])][1:]
    params = [p for p in prep.model.parameters() if p.requires_grad]     # state bytes on the optimizer object
    opt = make_optimizer(optimizer, params, lr=lr)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    return {"final": statistics.fmean(losses[-5:]), "last": losses[-1], "state": state_nbytes(opt),
            "step_s": statistics.median(times) if times else float("nan"), "n_trainable": res.n_trainable}


def child(case: str, optimizer: str, a) -> None:
    """Runs in its own process: one training, its figures as JSON on the last stdout line."""
    torch.set_num_threads(a.threads)
    method, lr = CASES[case]
    print(json.dumps(run(method, lr, optimizer, a.steps, a.seq, a.batch)), flush=True)


def progress_lines(log: Path) -> list[str]:
    return [x for x in log.read_text(errors="replace").splitlines() if x.startswith("[")] if log.exists() else []


def trail(lines: list[str]) -> dict:
    """{step: (loss, seconds)} from a child's progress lines."""
    out = {}
    for x in lines:
        parts = x.split("] ", 1)[1].split()       # step N/M loss L S s
        out[int(parts[1].split("/")[0])] = (float(parts[3]), float(parts[4]))
    return out


def run_all(a) -> dict:
    """{(case, optimizer): figures} from child processes, `a.jobs` at a time. A run
    still going after `a.deadline` seconds is stopped; its entry then says how far it got."""
    import tempfile
    logs = Path(tempfile.mkdtemp(prefix="bench-optimizers-"))
    start = time.perf_counter()
    todo = [(case, opt) for case in a.cases.split(",") for opt in ("adamw", "adamw_8bit")]
    for case, _ in todo:
        if case not in CASES:
            sys.exit(f"--cases: unknown {case!r}; choose from {', '.join(CASES)}")
    running: dict = {}
    results: dict = {}
    def overdue() -> bool:
        return a.deadline is not None and time.perf_counter() - start > a.deadline

    while running or (todo and not overdue()):
        while todo and len(running) < a.jobs and not overdue():
            key = todo.pop(0)
            cmd = [sys.executable, __file__, "--child", *key, "--steps", str(a.steps), "--seq", str(a.seq),
                   "--batch", str(a.batch), "--threads", str(a.threads)]
            log = logs / f"{key[0]}-{key[1]}.log"
            running[key] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True), log)
        time.sleep(1)
        late = overdue()
        for key, (proc, log) in list(running.items()):
            if proc.poll() is None and late:
                proc.kill()
                proc.wait()
                del running[key]
                lines = progress_lines(log)
                results[key] = {"unfinished": f"stopped after {a.deadline:.0f} s at "
                                              f"{lines[-1].split('] ', 1)[1] if lines else 'no step finished'}",
                                "trail": trail(lines)}
                continue
            if proc.poll() is None:
                continue
            out = proc.stdout.read().strip().splitlines()
            del running[key]
            if proc.returncode != 0 or not out:
                sys.exit(f"the {key[0]} / {key[1]} run failed (exit {proc.returncode}):\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
            results[key] = json.loads(out[-1]) | {"trail": trail(progress_lines(log))}
            print(f"done: {key[0]} {key[1]} after {time.perf_counter() - start:.0f} s", flush=True)
    for key in todo:
        results[key] = {"unfinished": "not started before the deadline"}
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--cases", default="lora,full")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1, help="trainings run at once (child processes)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per training "
                    "(default: the CPU count divided by --jobs)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which unfinished runs are "
                    "stopped and reported as such (default: none)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "OPTIMIZER"), help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS-optimizers.md")
    ap.add_argument("--name", default="optimizers", help="write bench/RESULTS-<name>.md (e.g. one case run alone)")
    a = ap.parse_args()
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // max(1, a.jobs))
    if a.child:
        child(*a.child, a)
        return 0
    st = Stamp("bench/optimizers.py")
    print(st.header())
    t0 = time.perf_counter()
    results = run_all(a)
    st.say(f"smollm2-135m causal LM on demo-instruct, {a.steps} steps, batch {a.batch} x {a.seq} tokens, fp32, "
           f"linear schedule; final loss = mean of the last 5 steps. {len(results)} trainings in child processes, "
           f"{a.jobs} at a time with {a.threads} torch thread(s) each, {time.perf_counter() - t0:.0f} s in all")
    st.say()
    st.say("| case | trainable | final loss adamw | final loss 8-bit | ratio (<= 1.01) | state adamw | "
          "state 8-bit | ratio (<= 0.3) | step adamw (s) | step 8-bit (s) |")
    st.say("|---|---|---|---|---|---|---|---|---|---|")
    ok, unfinished = True, []
    for case in a.cases.split(","):
        ref, q8 = results[(case, "adamw")], results[(case, "adamw_8bit")]
        if "unfinished" in ref or "unfinished" in q8:
            unfinished.append((case, ref, q8))
            st.say(f"| {case} | NOT FINISHED: adamw {ref.get('unfinished', 'finished')}; adamw_8bit "
                   f"{q8.get('unfinished', 'finished')} |||||||||")
            continue
        lr_ratio, st_ratio = q8["final"] / ref["final"], q8["state"] / ref["state"]
        ok &= lr_ratio <= 1.01 and st_ratio <= 0.3
        st.say(f"| {case} | {ref['n_trainable']:,} | {ref['final']:.4f} | {q8['final']:.4f} | {lr_ratio:.4f} | "
              f"{ref['state'] / 1e6:.2f} MB | {q8['state'] / 1e6:.2f} MB | {st_ratio:.3f} | {ref['step_s']:.3f} | "
              f"{q8['step_s']:.3f} |")
    st.say()
    for case, ref, q8 in unfinished:       # what the unfinished runs did reach, step by step
        ta, tq = ref.get("trail", {}), q8.get("trail", {})
        st.say(f"{case}, loss at the steps both runs reached (adamw / adamw_8bit, ratio; seconds since the start "
               f"of training): " + ("; ".join(f"{k}: {ta[k][0]:.4f} / {tq[k][0]:.4f}, {tq[k][0] / ta[k][0]:.4f} "
                                              f"({ta[k][1]:.0f} / {tq[k][1]:.0f} s)"
                                              for k in sorted(set(ta) & set(tq))) or "none"))
        st.say()
    if unfinished:
        st.say(f"Targets NOT CHECKED for {', '.join(c for c, _, _ in unfinished)}: the runs did not finish "
               f"within --deadline {a.deadline:.0f} s" + (f"; the finished cases {'met' if ok else 'did NOT meet'} "
                                                           f"them" if len(unfinished) < len(a.cases.split(",")) else ""))
    else:
        st.say(f"Targets {'met' if ok else 'NOT met'}.")
    if not a.no_write:
        print("wrote", st.write(a.name, title="8-bit AdamW vs fp32 AdamW"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
