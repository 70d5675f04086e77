"""Section `peers` of bench/gpu_check.py: a real run of `engine.train` against Hugging Face
`Trainer` + `peft` with the base loaded in bf16 (how LLaMA-Factory and Axolotl users run LoRA),
measured in the same process, one after the other, on the same data (issue #25, item 4).

Cases (GPU): SmolLM2-135M at 8 x 1024 and a Llama-3.2-1B-shaped model with random weights at
4 x 2048, LoRA r16 alpha 32 on all seven linears of every block, AdamW, lr 2e-4. Every data row
is longer than the sequence, so every batch on both sides is exactly batch x seq tokens.
Engine sides: `precision: bf16` eager (the default path), `training.compile: true` (torch.compile
of each block: the baseline the eager path must beat), `training.compile: cudagraphs` (each
compiled block replayed as a CUDA graph), and QLoRA (NF4 base, same LoRA, eager).

- steady step: mean seconds per step after the warm-up (the engine's own step clock in
  `TrainResult.history`; on the peft side a `TrainerCallback` that synchronizes the device at
  every step end), over the same steps on every side;
- peak: `torch.cuda.max_memory_allocated` over training (reset once the model sits on the
  device, so both sides count their resident weights and nothing of loading);
- estimate: the estimator's bf16 total for the case without the CUDA context row, which
  max_memory_allocated cannot see;
- GPU busy: the union of the CUDA kernels' intervals in a profiler trace of the last steps of
  the eager run, over the same number of unprofiled steady steps (the profiler slows the host,
  not the kernels); with the kernels that took the most time.

`--dry-run` runs the same code on the CPU with a tiny random Llama saved as a model directory,
a few steps, no compile (Inductor's C++ build takes minutes there; tests/test_compile.py covers
the compiled path) and a CPU-only profile (no busy figure).
"""

from __future__ import annotations

import csv
import json
import os
import random
import tempfile
import time
import traceback
from pathlib import Path

import torch

MiB = 1 << 20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA16 = {"name": "lora", "r": 16, "alpha": 32, "target_modules": TARGETS}
GPU = dict(steps=30, warm=10, profiled=3, rows=400, words=1400)
DRY = dict(steps=5, warm=2, profiled=2, rows=24, words=120)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
# what issue #25 asks of the GPU path (ratios to HF Trainer + peft on a bf16 base)
TARGET_STEP = {"smollm2-135m": 0.6, "llama-3.2-1b shape": 0.75}
TARGET_PEAK = {"smollm2-135m": 0.7, "llama-3.2-1b shape": 0.8}
TARGET_QLORA = 1.3
TARGET_BUSY = 0.8
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there been one all we their has would when if so no will more its who can").split()


def write_data(path: Path, rows: int, words: int) -> Path:
    rng = random.Random(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "response"])
        for _ in range(rows):
            w.writerow([" ".join(rng.choice(WORDS) for _ in range(20)),
                        " ".join(rng.choice(WORDS) for _ in range(words))])
    return path


def tokenizer_source() -> Path:
    from engine.models import smollm2_dir
    return smollm2_dir()


def llama_1b_dir(dev: torch.device) -> Path:
    """A Llama-3.2-1B-shaped model with random weights (bf16) and SmolLM2's tokenizer (its ids stay
    below the vocabulary): /tmp/llama1b, made once (the device kit's run.sh makes the same with
    DEVICE_1B=1)."""
    import shutil
    from transformers import LlamaConfig, LlamaForCausalLM
    d = Path(os.environ.get("STUDIO_BENCH_1B_DIR", "/tmp/llama1b"))
    if not (d / "model.safetensors").exists() and not list(d.glob("model-*.safetensors")):
        d.mkdir(parents=True, exist_ok=True)
        src = tokenizer_source()
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (src / f).exists():
                shutil.copy(src / f, d)
        torch.manual_seed(0)
        with torch.device(dev):
            m = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
        m.save_pretrained(d, safe_serialization=True)
        del m
    return d


def tiny_llama_dir() -> Path:
    """The random tiny-llama saved as a model directory, so both sides load the same files."""
    from engine.models import load_model
    d = Path(tempfile.mkdtemp(prefix="gpu-peers-tiny-"))
    loaded = load_model("tiny-llama", "causal_lm")
    loaded.model.save_pretrained(d, safe_serialization=True)
    loaded.tokenizer.save_pretrained(d)
    return d


def reset(dev: torch.device) -> None:
    import gc
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def busy_from_trace(trace: Path) -> tuple[float, list[tuple[str, float]]]:
    """(microseconds the GPU ran any kernel, union of intervals; [(kernel, total µs)] top 6) from a
    chrome trace the torch profiler exported."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    spans, per = [], {}
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            spans.append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
            per[e.get("name", "?")] = per.get(e.get("name", "?"), 0.0) + float(e["dur"])
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    return busy, sorted(per.items(), key=lambda kv: -kv[1])[:6]


class Profiled:
    """An on_step callback that profiles steps (first, last] of a run and keeps the trace."""

    def __init__(self, first: int, last: int, dev: torch.device, out_dir: Path):
        self.first, self.last, self.dev, self.trace = first, last, dev, out_dir / "trace.json"
        self.prof = None

    def __call__(self, sm) -> None:
        from torch.profiler import ProfilerActivity, profile
        if sm.step == self.first:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev.type == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif sm.step == self.last and self.prof is not None:
            if self.dev.type == "cuda":
                torch.cuda.synchronize(self.dev)
            self.prof.__exit__(None, None, None)
            self.prof.export_chrome_trace(str(self.trace))
            self.prof = None


def engine_side(model: str, data: Path, batch: int, seq: int, method: dict, cfg: dict, dev: torch.device,
                compile_: bool | str = False, profile_dir: Path | None = None) -> dict:
    from engine.config import parse_run_config
    from engine.prepare import prepare_run
    from engine.train import train
    steps, warm, k = cfg["steps"], cfg["warm"], cfg["profiled"]
    run = parse_run_config({
        "name": "gpu-peers", "model": model, "task": "causal_lm",
        "dataset": {"path": str(data), "prompt_column": "prompt", "response_column": "response",
                    "validation_fraction": 0.05},
        "method": method,
        "training": {"max_steps": steps, "batch_size": batch, "learning_rate": 2e-4, "max_seq_len": seq,
                     "eval_every": 0, "eval_batches": 1, "eval_generate": 0, "precision": "bf16",
                     "device": dev.type, "compile": compile_}})
    reset(dev)
    prep = prepare_run(run)
    prof = Profiled(steps - k, steps, dev, profile_dir) if profile_dir is not None else None
    res = train(prep, on_step=prof)
    h = res.history
    timed_end = steps - k if prof is not None else steps      # profiled steps are not timed
    a, b = h[warm - 1], h[timed_end - 1]
    out = {"step_s": (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]),
           "peak": res.peak_memory_bytes, "loss0": h[0]["loss"], "loss1": h[-1]["loss"],
           "first_step_s": h[0]["elapsed_s"]}
    if prof is not None and prof.trace.exists():
        busy_us, top = busy_from_trace(prof.trace)
        out["busy"] = busy_us / 1e6 / (k * out["step_s"]) if dev.type == "cuda" else None
        out["top"] = top
    del prep, res
    reset(dev)
    return out


def peft_side(model_dir: Path, data: Path, batch: int, seq: int, cfg: dict, dev: torch.device) -> dict:
    """HF Trainer + peft LoRA with the base loaded in bf16 (fp32 on the CPU dry run)."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    steps, warm = cfg["steps"], cfg["warm"]
    reset(dev)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    ds = datasets.load_dataset("csv", data_files=str(data))["train"]
    ds = ds.map(lambda ex: tok(ex["prompt"] + " " + ex["response"], truncation=True, max_length=seq),
                remove_columns=["prompt", "response"])

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    cuda = dev.type == "cuda"
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0,
                                     task_type="CAUSAL_LM"))
    stamps, losses = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)     # the model is on the device now

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize(dev)
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="gpu-peers-hf-"), per_device_train_batch_size=batch,
                             max_steps=steps, learning_rate=2e-4, bf16=cuda, use_cpu=not cuda, logging_steps=1,
                             save_strategy="no", report_to=[], dataloader_num_workers=0,
                             remove_unused_columns=False, max_grad_norm=1.0)
    tr = Trainer(model=m, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()])
    tr.train()
    out = {"step_s": (stamps[-1] - stamps[warm - 1]) / (len(stamps) - warm),
           "peak": torch.cuda.max_memory_allocated(dev) if cuda else None,
           "loss0": losses[0] if losses else float("nan"), "loss1": losses[-1] if losses else float("nan")}
    del tr, m
    reset(dev)
    return out


def estimate_wo_ctx(model: str, batch: int, seq: int) -> int | None:
    from engine.estimator import estimate
    try:
        e = estimate(model, LORA16, batch_size=batch, seq_len=seq, dtype="bf16", task="causal_lm", device="cuda")
    except (ValueError, OSError):
        return None
    return e.total - e.rows.get("cuda_context", 0)


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def peers_check(st, failures: list, dry: bool, dev: torch.device) -> None:
    cfg = dict(DRY if dry else GPU)
    # a shorter check (a first device call that validates before the full one): fewer steps, fewer cases
    if os.environ.get("STUDIO_PEERS_STEPS"):
        cfg["steps"], cfg["warm"] = int(os.environ["STUDIO_PEERS_STEPS"]), max(2, int(os.environ["STUDIO_PEERS_STEPS"]) // 3)
    only = os.environ.get("STUDIO_PEERS_CASES", "smollm2-135m,llama-3.2-1b shape").split(",")
    work = Path(tempfile.mkdtemp(prefix="gpu-peers-"))
    data = write_data(work / "long.csv", cfg["rows"], cfg["words"])
    if dry:
        tiny = tiny_llama_dir()
        cases = [("tiny-llama", str(tiny), tiny, 2, 64)]
    else:
        cases = [("smollm2-135m", "smollm2-135m", tokenizer_source(), 8, 1024)] if "smollm2-135m" in only else []
        try:
            if "llama-3.2-1b shape" in only:
                d = llama_1b_dir(dev)
                cases.append(("llama-3.2-1b shape", str(d), d, 4, 2048))
        except Exception as e:           # a missing tokenizer source, no room: say so, measure SmolLM2
            failures.append(f"peers: the 1B-shaped model could not be made: {type(e).__name__}: {e}"[:300])
    st.say(f"## 5. A real run against HF Trainer + peft with a bf16 base ({dev.type})")
    st.say()
    st.say(f"LoRA r16 alpha 32 on all seven linears, AdamW lr 2e-4, every batch full; {cfg['steps']} steps, steady "
           f"step = mean after {cfg['warm']} warm-up steps (the engine's last {cfg['profiled']} steps are profiled "
           f"and not timed); peak = max_memory_allocated over training with the model resident; estimate = "
           f"bf16 total without the CUDA context. Ratios are engine / HF + peft.")
    if dry:
        st.say("DRY RUN: CPU, tiny random Llama, fp32 on the peft side; compile skipped (tests/test_compile.py).")
    st.say()
    st.say("| case | side | steady step (s) | step vs HF+peft | peak (MiB) | peak vs HF+peft | estimate (MiB) | "
           "first step (s) | loss first / last |")
    st.say("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for label, model, model_dir, batch, seq in cases:
        sides = {}
        plan = [("engine eager", lambda: engine_side(model, data, batch, seq, LORA16, cfg, dev, profile_dir=work)),
                ("HF Trainer + peft", lambda: peft_side(Path(model_dir), data, batch, seq, cfg, dev)),
                ("engine QLoRA", lambda: engine_side(model, data, batch, seq, dict(LORA16, name="qlora"), cfg, dev,
                                                     profile_dir=work))]
        if not dry:
            plan[1:1] = [(f"engine compile{' + CUDA graphs' if c == 'cudagraphs' else ''}",
                          lambda c=c: engine_side(model, data, batch, seq, LORA16, cfg, dev, compile_=c,
                                                  profile_dir=work))
                         for c in (True, "cudagraphs")]
        for side, fn in plan:
            t0 = time.perf_counter()
            try:
                sides[side] = fn()
            except Exception as e:       # one side failing must not cost the others their device time
                traceback.print_exc()
                failures.append(f"peers {label} {side}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                st.say(f"| {label} | {side} | FAILED: {failures[-1]} ||||||||")
            print(f"peers {label} {side}: {time.perf_counter() - t0:.0f} s", flush=True)
        ref = sides.get("HF Trainer + peft")
        est = estimate_wo_ctx(model if not dry else str(Path(model_dir) / "config.json"), batch, seq)
        for side, r in sides.items():
            step_ratio = f"{r['step_s'] / ref['step_s']:.2f}" if ref and side != "HF Trainer + peft" else ""
            peak_ratio = f"{r['peak'] / ref['peak']:.2f}" if ref and ref["peak"] and r["peak"] and \
                side != "HF Trainer + peft" else ""
            st.say(f"| {label} | {side} | {r['step_s']:.4f} | {step_ratio} | {_mib(r['peak'])} | {peak_ratio} | "
                   f"{_mib(est) if side == 'engine eager' else ''} | {r.get('first_step_s', float('nan')):.2f} | "
                   f"{r['loss0']:.3f} / {r['loss1']:.3f} |")
        summary.append((label, sides, est))
    st.say()
    for label, sides, est in summary:
        eng, ref, comp, q = (sides.get(k) for k in ("engine eager", "HF Trainer + peft", "engine compile",
                                                    "engine QLoRA"))
        parts = []
        if eng and ref and ref["peak"]:
            ts, tp = TARGET_STEP.get(label), TARGET_PEAK.get(label)
            sr, pr = eng["step_s"] / ref["step_s"], eng["peak"] / ref["peak"]
            parts.append(f"step {sr:.2f}x HF+peft (target <= {ts}: {'met' if ts and sr <= ts else 'NOT met'}), "
                         f"peak {pr:.2f}x (target <= {tp}: {'met' if tp and pr <= tp else 'NOT met'})")
        graphs = sides.get("engine compile + CUDA graphs")
        for name, other in (("compiled", comp), ("compiled + CUDA graphs", graphs)):
            if eng and other:
                parts.append(f"eager / {name} step {eng['step_s'] / other['step_s']:.2f}")
                # same data, seed and steps: a compiled run that does not learn as eager does is broken
                if abs(other["loss1"] - eng["loss1"]) > 0.02 * abs(eng["loss1"] - eng["loss0"]) + 0.02:
                    failures.append(f"peers {label} {name}: last loss {other['loss1']:.4f} vs eager "
                                    f"{eng['loss1']:.4f} (first {eng['loss0']:.4f})")
                    parts.append(f"{name} LEARNS DIFFERENTLY from eager")
        if eng and q:
            qr = q["step_s"] / eng["step_s"]
            parts.append(f"QLoRA / LoRA step {qr:.2f} (target <= {TARGET_QLORA}: "
                         f"{'met' if qr <= TARGET_QLORA else 'NOT met'})")
        if eng and est and eng["peak"]:
            parts.append(f"estimate / measured peak {est / eng['peak']:.2f}")
        for side in ("engine eager", "engine compile", "engine compile + CUDA graphs", "engine QLoRA"):
            r = sides.get(side)
            if r and r.get("busy") is not None:
                parts.append(f"GPU busy in {side}: {100 * r['busy']:.0f}% of the step (target >= "
                             f"{100 * TARGET_BUSY:.0f}%: {'met' if r['busy'] >= TARGET_BUSY else 'NOT met'})")
        for side, r in sides.items():
            if r and not all(x == x and abs(x) != float("inf") for x in (r["loss0"], r["loss1"])):
                failures.append(f"peers {label} {side}: a non-finite loss")
        st.say(f"- {label}: " + ("; ".join(parts) if parts else "nothing to compare"))
        for side in ("engine eager", "engine QLoRA"):
            r = sides.get(side)
            if r and r.get("top"):
                st.say(f"  - {side}: the kernels that took the most GPU time over {cfg['profiled']} profiled steps: "
                       + "; ".join(f"`{name[:60]}` {us / 1e3:.1f} ms" for name, us in r["top"]))
    st.say()
