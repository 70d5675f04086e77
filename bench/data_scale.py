"""Data at scale (issue 19): LoRA for 5 steps over 20k / 200k / 2M synthetic rows,
tiny-bert (classification) and tiny-llama (causal LM, unpacked and packed), each in
a fresh process: wall time of a first run and of a rerun from the data cache, time
to the first optimizer step, peak RSS. The reference is the usual pipeline in the
same run: `datasets.load_dataset` + batched `map` + transformers `Trainer` with peft
LoRA (its map cache on, so its rerun is cached too). Then packing's tokens/s on
demo-instruct against unpacked.

    .venv/bin/python bench/data_scale.py [--rows 20000,200000,2000000] [--skip-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stamp import Stamp

ROOT = Path(__file__).resolve().parents[1]
WORDS = "good bad fine great awful plot actor scene movie long short boring fun dull sharp warm".split()

# what both children start with: a clock and their own peak RSS
CHILD_PREAMBLE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
def peak_rss_mb():
    # VmHWM is this process's own peak; ru_maxrss would also count the parent's RSS at fork
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

ENGINE = CHILD_PREAMBLE + r"""
from engine.config import parse_run_config
from engine.prepare import prepare_run
from engine.train import train
cfg = parse_run_config(json.loads(sys.argv[1]))
first = {}
def on_step(m):
    first.setdefault("t", time.perf_counter() - t0)
r = train(prepare_run(cfg, data_cache_dir=sys.argv[2]), on_step=on_step)
print(json.dumps({"wall_s": time.perf_counter() - t0, "first_step_s": first["t"], "tokens_per_s": r.tokens_per_s,
                  "peak_rss_mb": peak_rss_mb()}))
"""

REFERENCE = CHILD_PREAMBLE + r"""
import datasets, torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, DataCollatorForLanguageModeling,
                          DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)
from engine.models import load_tokenizer, tiny_config
kind, path, cache, out = sys.argv[1:5]
tok = load_tokenizer("tiny-bert")
ds = datasets.load_dataset("csv", data_files=path, split="train", cache_dir=cache)
torch.manual_seed(0)
if kind == "bert":
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"])
    model = AutoModelForSequenceClassification.from_config(tiny_config("bert", len(tok), num_labels=2))
    target, collator = ["query", "value"], DataCollatorWithPadding(tok)
else:
    ds = ds.map(lambda b: tok([p + "\n" + r for p, r in zip(b["prompt"], b["response"])], truncation=True,
                              max_length=32), batched=True, remove_columns=["prompt", "response"])
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tok)))
    target, collator = ["q_proj", "v_proj"], DataCollatorForLanguageModeling(tok, mlm=False)
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target))
first = {}
class First(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        first.setdefault("t", time.perf_counter() - t0)
args = TrainingArguments(output_dir=out, max_steps=5, per_device_train_batch_size=8, learning_rate=5e-4,
                         report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, disable_tqdm=True)
Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[First()]).train()
print(json.dumps({"wall_s": time.perf_counter() - t0, "first_step_s": first["t"], "tokens_per_s": 0.0,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def write_rows(path: Path, kind: str, n: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    vocab = np.asarray(WORDS)
    with open(path, "w") as f:
        f.write("text,label\n" if kind == "bert" else "prompt,response\n")
        for lo in range(0, n, 100_000):
            k = min(100_000, n - lo)
            w = vocab[rng.integers(0, len(vocab), size=(k, 12))]
            if kind == "bert":
                f.write("".join(" ".join(r) + f",{y}\n" for r, y in zip(w, rng.integers(0, 2, size=k))))
            else:
                f.write("".join(" ".join(r[:6]) + "," + " ".join(r[6:]) + "\n" for r in w))


def child(code: str, *args: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_cfg(kind: str, path: str, packing: bool = False, steps: int = 5, dataset=None) -> str:
    task = "classification" if kind == "bert" else "causal_lm"
    model = "tiny-bert" if kind == "bert" else "tiny-llama"
    return json.dumps({"model": model, "task": task, "dataset": dataset or {"path": path},
                       "method": {"name": "lora", "r": 8, "alpha": 16,
                                  "target_modules": ["query", "value"] if kind == "bert" else ["q_proj", "v_proj"]},
                       "training": {"max_steps": steps, "batch_size": 8, "max_seq_len": 32 if not dataset else 128,
                                    "eval_every": 0, "eval_max_rows": 256, "packing": packing, "eval_generate": 0}})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="20000,200000,2000000")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS-data.md")
    a = ap.parse_args()
    st = Stamp("bench/data_scale.py")
    print(st.header(), flush=True)
    st.say("```")
    work = Path(tempfile.mkdtemp(prefix="data-scale-"))
    rows = [int(x) for x in a.rows.split(",")]
    results = {}
    st.say(f"{'case':28} {'rows':>9} {'first s':>8} {'cached s':>9} {'1st step s':>10} {'cached 1st':>10} "
           f"{'peak MB':>8} {'cached MB':>9}")
    for n in rows:
        for kind, packing, label in (("bert", False, "engine tiny-bert"), ("llama", False, "engine tiny-llama"),
                                     ("llama", True, "engine tiny-llama packed"), ("bert", None, "reference tiny-bert"),
                                     ("llama", None, "reference tiny-llama")):
            if packing is None and a.skip_reference:
                continue
            path = work / f"{kind}-{n}.csv"
            if not path.exists():
                write_rows(path, kind, n)
            cache = work / f"cache-{label.replace(' ', '-')}-{n}"
            if packing is None:
                runs = [child(REFERENCE, kind, str(path), str(cache), str(work / "out")) for _ in range(2)]
            else:
                runs = [child(ENGINE, engine_cfg(kind, str(path), packing), str(cache)) for _ in range(2)]
            results[(label, n)] = runs
            st.say(f"{label:28} {n:>9,} {runs[0]['wall_s']:>8.1f} {runs[1]['wall_s']:>9.1f} "
                   f"{runs[0]['first_step_s']:>10.1f} {runs[1]['first_step_s']:>10.1f} {runs[0]['peak_rss_mb']:>8.0f} "
                   f"{runs[1]['peak_rss_mb']:>9.0f}")
    lo, hi = rows[0], rows[-1]
    st.say("\nratios")
    for label in ("engine tiny-bert", "engine tiny-llama", "engine tiny-llama packed"):
        a_lo, a_hi = results[(label, lo)], results[(label, hi)]
        st.say(f"  {label}: peak RSS at {hi:,} - at {lo:,}: {max(r['peak_rss_mb'] for r in a_hi) - max(r['peak_rss_mb'] for r in a_lo):+.0f} MB "
               f"(target <= +300); cached rerun at {hi:,} / first run at {lo:,}: "
               f"{a_hi[1]['wall_s'] / a_lo[0]['wall_s']:.2f}x (target <= 1.5x)")
        ref = results.get((label.replace("engine", "reference").replace(" packed", ""), hi))
        if ref:
            st.say(f"    vs reference at {hi:,}: first run {a_hi[0]['wall_s'] / ref[0]['wall_s']:.2f}x time, "
                   f"cached {a_hi[1]['wall_s'] / ref[1]['wall_s']:.2f}x time, "
                   f"peak {a_hi[0]['peak_rss_mb'] / ref[0]['peak_rss_mb']:.2f}x RSS")
    ds = {"name": "demo-instruct"}
    tps = {}
    for packing in (False, True):
        tps[packing] = child(ENGINE, engine_cfg("llama", "", packing, steps=30, dataset=ds),
                             str(work / "cache-demo"))["tokens_per_s"]
    st.say(f"\ndemo-instruct, tiny-llama LoRA, 30 steps, batch 8, max_seq_len 128: tokens/s unpacked {tps[False]:,.0f}, "
           f"packed {tps[True]:,.0f}: {tps[True] / tps[False]:.2f}x (target >= 1.5x)")
    st.say("```")
    if not a.no_write:
        print("wrote", st.write("data", title="Data at scale"))


if __name__ == "__main__":
    main()
