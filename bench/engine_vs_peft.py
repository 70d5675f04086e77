"""Engine vs Hugging Face peft: training step time and peak memory, same process
for timing (interleaved steps, median after warm-up) and one subprocess per side
for peak RSS: each child loads the same model the same way, returns freed
loading buffers to the OS (malloc_trim), then samples its resident set every
10 ms during the training steps (warm-up included); that peak is what is compared.

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


def build(side: str, case: dict, method: dict | None):
    """(step function, model) for one side: engine (our method + our loss) or peft
    (peft LoRA + the model's own loss) or hf (plain transformers, full FT)."""
    from engine.models import load_model
    from engine.methods import ApplyContext, get_method, parse_method_config
    from engine.prepare import apply_method
    from engine.train import compute_loss

    model = load_model(case["model"], case["task"]).model.float()
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
    print(json.dumps({"peak_rss": rss.peak, "lifetime_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "median_s": statistics.median(times)}))


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


def run_child(side, case_name, method, steps, warmup, repeats: int = 1) -> dict:
    """Peak RSS of `repeats` fresh processes for one side: the median, and the spread
    (the glibc heap makes a process's peak vary by up to ~0.1 GB from run to run)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", side, case_name, json.dumps(method),
                              "--steps", str(steps), "--warmup", str(warmup)],
                             capture_output=True, text=True, env=env, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    peaks = sorted(r["peak_rss"] for r in runs)
    return {"peak_rss": statistics.median(peaks), "peak_min": peaks[0], "peak_max": peaks[-1],
            "median_s": statistics.median(r["median_s"] for r in runs)}


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
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per side for peak RSS (median)")
    a = ap.parse_args()
    if a.child:
        child(*a.child, a.steps, a.warmup)
        return
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    rows = []

    def pair(label, case_name, case, side_a, meth_a, side_b, meth_b, time_in_process=True):
        if time_in_process:
            ta, tb = interleaved_times(build(side_a, case, meth_a), build(side_b, case, meth_b), case,
                                       a.steps, a.warmup)
        ma = run_child(side_a, case_name, meth_a, a.steps, a.warmup, a.repeats)
        mb = run_child(side_b, case_name, meth_b, a.steps, a.warmup, a.repeats)
        if not time_in_process:
            ta, tb = ma["median_s"], mb["median_s"]
        rows.append((label, ta, tb, ma, mb))
        print(f"{label}: {ta:.3f} s vs {tb:.3f} s ({ta / tb:.2f}x); peak RSS {gb(ma['peak_rss'])} vs "
              f"{gb(mb['peak_rss'])} ({ma['peak_rss'] / mb['peak_rss']:.2f}x)", flush=True)

    pair("smollm2-135m LoRA r=8 q,v  4x128  engine vs peft", "smol", SMOL, "engine", LORA_SMOL, "peft", LORA_SMOL)
    pair("minilm LoRA r=8 query,value 8x128 engine vs peft", "mini", MINI, "engine", LORA_MINI, "peft", LORA_MINI)
    if not a.skip_full:
        pair("smollm2-135m full FT 4x128  engine vs transformers", "smol", SMOL, "engine", {"name": "full"},
             "hf", None, time_in_process=False)
    qlora = dict(LORA_SMOL, name="qlora")
    pair("smollm2-135m QLoRA vs LoRA (engine, both)     ", "smol", SMOL, "engine", qlora, "engine", LORA_SMOL,
         time_in_process=False)

    print()
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"CPU fp32, median of {a.steps} steps after {a.warmup} warm-up; peak RSS: median of {a.repeats} "
          f"processes per side (min-max)")
    print("| case | A step (s) | B step (s) | time A/B | A peak RSS | B peak RSS | memory A/B |")
    print("|---|---|---|---|---|---|---|")
    for label, ta, tb, ma, mb in rows:
        def cell(m):
            return f"{gb(m['peak_rss'])} ({m['peak_min'] / 1e9:.2f}-{m['peak_max'] / 1e9:.2f})"
        print(f"| {label.strip()} | {ta:.3f} | {tb:.3f} | {ta / tb:.2f} | {cell(ma)} | {cell(mb)} | "
              f"{ma['peak_rss'] / mb['peak_rss']:.2f} |")


if __name__ == "__main__":
    main()
