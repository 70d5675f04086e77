"""Engine vs Hugging Face peft: training step time and peak memory.

Each side runs in fresh processes, alternately (A, B, A, B, ...; `--repeats` per
side): a child loads the model the same way, returns freed loading buffers to the
OS (malloc_trim), then times its steps (median after warm-up) while sampling its
resident set every 10 ms (warm-up included). Each process is printed as it ends:
its step times, peak and the engine's GEMM backend picks (engine.gemm.picks).
Reported: the median step time over the processes (default 5 per side) with their
range, and the median peak RSS. The LoRA rows are also timed the way the
issue first asked, both models in one process with their steps interleaved; that
figure is printed next to it but not used for the ratio: in one process the two
models disturb each other unevenly (SmolLM2: peft's MKL steps 15-25% slower than
alone while the engine's oneDNN steps are unchanged; MiniLM: the other way round).

Cases: LoRA r=8 on q_proj, v_proj of smollm2-135m (fp32, CPU, batch 4 x 128,
causal LM); full fine-tuning (engine vs plain transformers); engine QLoRA vs
engine LoRA memory; minilm batch 8 x 128 classification LoRA (query, value).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_vs_peft.py [--steps 5] [--warmup 2]

peft is a reference here only; the product never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from stamp import Stamp  # noqa: E402

SMOL = dict(model="smollm2-135m", task="causal_lm", batch=4, seq=128)
MINI = dict(model="minilm", task="classification", batch=8, seq=128)
LORA_SMOL = {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LORA_MINI = {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]}


def make_batch(vocab: int, batch: int, seq: int, task: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    b["labels"] = ids.clone() if task == "causal_lm" else torch.randint(0, 2, (batch,), generator=g)
    return b


def build_model(side: str, case: dict, method: dict | None, base_hook=None):
    """(model, loss function of a batch) for one side, fp32 on CPU: engine (our method
    + our loss) or peft (peft LoRA + the model's own loss) or hf (plain transformers,
    full FT). `base_hook(model) -> model` runs on the loaded base first (bench/gpu_check.py,
    which builds its sides with this too, quantizes peft's QLoRA base there)."""
    from engine.models import load_model
    from engine.methods import ApplyContext, get_method, parse_method_config
    from engine.prepare import apply_method
    from engine.train import compute_loss

    model = load_model(case["model"], case["task"]).model.float()
    if base_hook is not None:
        model = base_hook(model)
    task = case["task"]
    if side == "engine":
        cfg = parse_method_config(method)
        model = apply_method(model, get_method(cfg.name), cfg, ApplyContext(task=task))

        def loss_fn(b):
            return compute_loss(model, b, task)
    else:
        if side == "peft":
            from peft import LoraConfig, get_peft_model
            pc = LoraConfig(r=method["r"], lora_alpha=method["alpha"], target_modules=method["target_modules"],
                            lora_dropout=0.0, task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM")
            model = get_peft_model(model, pc)
        else:  # hf full fine-tuning
            for p in model.parameters():
                p.requires_grad_(True)

        def loss_fn(b):
            return model(**b).loss
    model.train()
    return model, loss_fn


def build(side: str, case: dict, method: dict | None):
    """(step function, model) for one side (see build_model), with AdamW."""
    model, loss_fn = build_model(side, case, method)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(b):
        t0 = time.perf_counter()
        loss = loss_fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step, model


def child(side: str, case_name: str, method_json: str, steps: int, warmup: int) -> None:
    """Runs in its own process: prints peak RSS and step times as JSON."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    case = SMOL if case_name == "smol" else MINI
    method = json.loads(method_json) if method_json != "null" else None
    from engine.train import PeakRSS
    step, model = build(side, case, method)
    b = make_batch(model.config.vocab_size, case["batch"], case["seq"], case["task"])
    release_free_memory()
    with PeakRSS(interval=0.01) as rss:
        times = [step(b) for _ in range(warmup + steps)][warmup:]
    from engine import fused, gemm
    picks = gemm.picks()
    print(json.dumps({"peak_rss": rss.peak, "lifetime_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "median_s": statistics.median(times), "times_s": [round(t, 4) for t in times],
                      "gemm_shapes": len(picks), "gemm_shapes_onednn": sum(p["backend"] == "onednn" for p in picks.values()),
                      "gemm_picks": picks, "fused_kernels": fused.library() is not None}))


def release_free_memory() -> None:
    """Give freed loading buffers back to the OS so the training peak is not hidden
    under the model-loading peak (which is the same for both sides)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def one_child(side, case_name, method, steps, warmup) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, "--child", side, case_name, json.dumps(method),
                          "--steps", str(steps), "--warmup", str(warmup)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"the {side} process for {case_name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    """Peak RSS: the median over processes and its spread (the glibc heap makes a
    process's peak vary by up to ~0.1 GB from run to run); step time: the median of
    the per-process medians, and their range; GEMM picks: how many distinct sets of
    backend picks the processes made (1: every process picked alike)."""
    peaks = sorted(r["peak_rss"] for r in runs)
    steps = sorted(r["median_s"] for r in runs)
    pick_sets = {json.dumps({k: p["backend"] for k, p in r["gemm_picks"].items()}, sort_keys=True) for r in runs}
    return {"peak_rss": statistics.median(peaks), "peak_min": peaks[0], "peak_max": peaks[-1],
            "median_s": statistics.median(steps), "step_min": steps[0], "step_max": steps[-1],
            "gemm": f"{runs[0]['gemm_shapes_onednn']} of {runs[0]['gemm_shapes']}", "gemm_pick_sets": len(pick_sets),
            "fused": runs[0]["fused_kernels"]}


def describe_process(side: str, r: dict) -> str:
    """One line per fresh process: its step time, peak and GEMM backend picks."""
    picks = r["gemm_picks"]
    ratios = sorted(p["onednn_over_blas"] for p in picks.values())
    span = f", oneDNN/BLAS time {ratios[0]:.2f}-{ratios[-1]:.2f}" if ratios else ""
    return (f"  {side:>6}: step {r['median_s']:.3f} s (steps {', '.join(f'{t:.3f}' for t in r['times_s'])}), "
            f"peak {gb(r['peak_rss'])}, GEMM oneDNN for {r['gemm_shapes_onednn']} of {r['gemm_shapes']} shapes{span}")


def run_children(a: tuple, b: tuple, case_name: str, steps: int, warmup: int, repeats: int) -> tuple[dict, dict]:
    """`repeats` fresh processes per side, alternating A, B, A, B, ... so that a
    drift of the machine hits both sides alike. a, b: (side, method)."""
    runs_a, runs_b = [], []
    for _ in range(repeats):
        runs_a.append(one_child(a[0], case_name, a[1], steps, warmup))
        print(describe_process(a[0], runs_a[-1]), flush=True)
        runs_b.append(one_child(b[0], case_name, b[1], steps, warmup))
        print(describe_process(b[0], runs_b[-1]), flush=True)
    return summarize(runs_a), summarize(runs_b)


def interleaved_times(a: tuple, b: tuple, case: dict, steps: int, warmup: int) -> tuple[float, float]:
    (step_a, model_a), (step_b, _) = a, b
    batch = make_batch(model_a.config.vocab_size, case["batch"], case["seq"], case["task"])
    ta, tb = [], []
    for i in range(warmup + steps):
        x, y = step_a(batch), step_b(batch)
        if i >= warmup:
            ta.append(x)
            tb.append(y)
    return statistics.median(ta), statistics.median(tb)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3, metavar=("SIDE", "CASE", "METHOD"))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per side (median)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS-engine.md")
    a = ap.parse_args()
    if a.child:
        child(*a.child, a.steps, a.warmup)
        return
    st = Stamp("bench/engine_vs_peft.py")
    print(st.header(), flush=True)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rows = []

    def pair(label, case_name, case, side_a, meth_a, side_b, meth_b, interleave=True):
        inter = None
        if interleave:
            inter = interleaved_times(build(side_a, case, meth_a), build(side_b, case, meth_b), case,
                                      a.steps, a.warmup)
        ma, mb = run_children((side_a, meth_a), (side_b, meth_b), case_name, a.steps, a.warmup, a.repeats)
        rows.append((label, inter, ma, mb))
        also = f"; interleaved in one process {inter[0]:.3f} s vs {inter[1]:.3f} s ({inter[0] / inter[1]:.2f}x)" \
            if inter else ""
        st.say(f"{label}: {ma['median_s']:.3f} s vs {mb['median_s']:.3f} s ({ma['median_s'] / mb['median_s']:.2f}x; "
               f"per process {ma['step_min']:.3f}-{ma['step_max']:.3f} vs {mb['step_min']:.3f}-{mb['step_max']:.3f})"
               f"{also}; peak RSS {gb(ma['peak_rss'])} vs {gb(mb['peak_rss'])} "
               f"({ma['peak_rss'] / mb['peak_rss']:.2f}x)")

    pair("smollm2-135m LoRA r=8 q,v  4x128  engine vs peft", "smol", SMOL, "engine", LORA_SMOL, "peft", LORA_SMOL)
    pair("minilm LoRA r=8 query,value 8x128 engine vs peft", "mini", MINI, "engine", LORA_MINI, "peft", LORA_MINI)
    if not a.skip_full:
        pair("smollm2-135m full FT 4x128  engine vs transformers", "smol", SMOL, "engine", {"name": "full"},
             "hf", None, interleave=False)
    qlora = dict(LORA_SMOL, name="qlora")
    pair("smollm2-135m QLoRA vs LoRA (engine, both)     ", "smol", SMOL, "engine", qlora, "engine", LORA_SMOL,
         interleave=False)

    st.say()
    from engine.gemm import gemm_mode
    engine_run = rows[0][2]
    st.say(f"threads {torch.get_num_threads()}, CPU fp32; engine GEMM backend mode {gemm_mode()} "
           f"(SmolLM2 LoRA: oneDNN kept for {engine_run['gemm']} "
           f"shapes timed, BLAS for the rest; {engine_run['gemm_pick_sets']} distinct pick set(s) over the "
           f"{a.repeats} processes), fused C kernels {'on' if engine_run['fused'] else 'OFF'}; step time: median "
           f"of {a.steps} steps after {a.warmup} warm-up per process, median over {a.repeats} fresh processes per "
           f"side run alternately (A, B, A, B, ...); peak RSS: median of the same processes (min-max)")
    st.say("| case | A step (s) | B step (s) | time A/B | time A/B interleaved in one process | A peak RSS | "
           "B peak RSS | memory A/B |")
    st.say("|---|---|---|---|---|---|---|---|")
    for label, inter, ma, mb in rows:
        def cell(m):
            return f"{gb(m['peak_rss'])} ({m['peak_min'] / 1e9:.2f}-{m['peak_max'] / 1e9:.2f})"
        ta, tb = ma["median_s"], mb["median_s"]
        il = f"{inter[0] / inter[1]:.2f} ({inter[0]:.3f} vs {inter[1]:.3f})" if inter else "-"
        st.say(f"| {label.strip()} | {ta:.3f} | {tb:.3f} | {ta / tb:.2f} | {il} | {cell(ma)} | {cell(mb)} | "
               f"{ma['peak_rss'] / mb['peak_rss']:.2f} |")
    if not a.no_write:
        print("wrote", st.write("engine", title="Engine vs peft"))


if __name__ == "__main__":
    main()
