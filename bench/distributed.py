"""Distributed training throughput: the same run (same global batch) on 1 and N ranks.

On CPU it runs 1 and 2 gloo ranks on this machine's cores (each rank gets
cores / ranks threads, so 2 ranks use the same cores as 1); with CUDA devices it
runs 1..N GPUs with nccl. For each world size it reports steady-state tokens/s
(the first steps, which build kernels and caches, are left out), every rank's peak
memory, and the scaling efficiency: tokens/s at N ranks / (N x tokens/s at 1 rank).

    .venv/bin/python bench/distributed.py [--model smollm2-135m] [--strategies ddp,fsdp]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from stamp import Stamp  # noqa: E402

from engine.launch import launch_local  # noqa: E402


def run_config(model: str, world: int, strategy: str, global_batch: int, seq: int, steps: int, device: str) -> dict:
    return {"name": f"bench-{strategy}-{world}", "model": model, "task": "causal_lm",
            "dataset": {"name": "demo-instruct"},
            "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": steps, "batch_size": global_batch // world, "learning_rate": 1e-4,
                         "max_seq_len": seq, "eval_every": 0, "eval_batches": 1, "device": device, "eval_generate": 0,
                         "precision": "fp32" if device == "cpu" else "bf16",
                         "distributed": {"world_size": world, "strategy": strategy}}}


def steady_tokens_per_s(history: list[dict], skip: int) -> float:
    """tokens/s between the end of step `skip` and the last step."""
    a, b = history[skip - 1], history[-1]
    tok = lambda h: h["tokens_per_s"] * h["elapsed_s"]   # noqa: E731  tokens seen by then
    return (tok(b) - tok(a)) / max(1e-9, b["elapsed_s"] - a["elapsed_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--strategies", default="ddp,fsdp")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of tokens/s")
    ap.add_argument("--max-ranks", type=int, default=None, help="default: 2 on CPU, every GPU on CUDA")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS-distributed.md")
    args = ap.parse_args()
    st = Stamp("bench/distributed.py")
    gpus = torch.cuda.device_count()
    device = "cuda" if gpus else "cpu"
    top = args.max_ranks or (gpus if gpus else 2)
    worlds = [w for w in range(1, top + 1) if args.global_batch % w == 0]
    print(st.header())
    st.say(f"{args.model} LoRA r8 q,v · global batch {args.global_batch} x seq {args.seq} · {args.steps} steps "
          f"({args.skip} warm-up left out) · {device}, {'nccl' if gpus else 'gloo'}")
    st.say("```")
    st.say(f"{'strategy':<9}{'ranks':>6}{'tokens/s':>12}{'efficiency':>12}{'loss':>10}   peak memory per rank (GiB)")
    base = None          # one rank has no process group: the same run for every strategy, measured once
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        for world in worlds:
            if world == 1 and base is not None:
                continue
            cfg = run_config(args.model, world, strategy, args.global_batch, args.seq, args.steps, device)
            with tempfile.TemporaryDirectory() as out:
                res = launch_local(cfg, out, world)
            tps = steady_tokens_per_s(res.history, args.skip)
            base = base if base is not None else tps
            peaks = res.rank_peak_memory_bytes or [res.peak_memory_bytes]
            eff = tps / (world * base)
            st.say(f"{strategy if world > 1 else '-':<9}{world:>6}{tps:>12.1f}{eff:>11.0%} {res.final_loss:>10.4f}   "
                  + " ".join(f"{p / 2**30:.2f}" for p in peaks) + f" ({res.memory_kind})")
    st.say("```")
    st.say("efficiency = tokens/s at N ranks / (N x tokens/s at 1 rank), same global batch")
    if not args.no_write:
        print("wrote", st.write("distributed", title="Distributed training throughput"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
