"""The estimator on a held-out grid: architectures and shapes its formulas were not fitted to.

PRE-REGISTERED. This grid was written and committed before it was ever run; the
`model` formula was not tuned against it, and must not be. If a run reveals a
genuine bug that is then fixed, the RESULTS file and the commit that fixes it say
so plainly, and the figures from before the fix stay reported beside it.

Grid (fixed here, before any run):

- models: three tiny random configs built from transformers' own config classes
  (no hub download), each saved as a directory with a config.json, which is what
  the estimator reads (the same path a user gives with `peft-studio estimate
  --model DIR`):
  * gpt2     : GPT-2 (Conv1D projections), hidden 256, 4 heads (head dim 64), 2 layers
  * mistral  : Mistral, hidden 320, 4 heads of 80, 2 KV heads (GQA 2:1), FFN 896, 2 layers, untied head
  * qwen2    : Qwen2, hidden 384, 4 heads of 96, 1 KV head (GQA 4:1), FFN 1024, 2 layers, tied embeddings
  all with the tiny models' vocabulary (30,522: MiniLM's WordPiece tokenizer), causal LM;
- shape: seq 768 x batch 2 (full random batches), fp32 on CPU, SDPA attention;
- methods: lora, dora, qlora (r = 16 for all three), ia3, prefix_tuning, prompt_tuning,
  houlsby, parallel_adapter, bitfit, full (their defaults otherwise);
- per case, as bench/estimator_accuracy.py does: hidden_states against the tensors
  autograd saves in one forward of our training loop; weights, gradients and optimizer
  against the real tensors of one training step; the estimate's total against that
  step's peak in torch's CPU allocator. Estimates with `device='cpu'` (no CUDA context).

Target: within ±10% on every row and the total. Misses are reported as they are.

    .venv/bin/python bench/estimator_heldout.py      # writes bench/RESULTS-estimator-heldout.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from estimator_accuracy import STEP_ROWS, TARGET, pct, step_summary, step_table  # noqa: E402
from stamp import Stamp  # noqa: E402

from engine.estimator import estimate  # noqa: E402
from engine.measure import measure_prepared, prepare_for_measure, step_peak  # noqa: E402

MiB = 1 << 20
SEQ, BATCH, RANK = 768, 2, 16
VOCAB = 30522
METHODS = ("lora", "dora", "qlora", "ia3", "prefix_tuning", "prompt_tuning", "houlsby", "parallel_adapter",
           "bitfit", "full")


def configs() -> dict:
    """The three held-out model configs (transformers config objects)."""
    from transformers import GPT2Config, MistralConfig, Qwen2Config

    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
    return {
        "gpt2": GPT2Config(n_embd=256, n_head=4, n_layer=2, n_positions=1024, **common),
        "mistral": MistralConfig(hidden_size=320, num_attention_heads=4, head_dim=80, num_key_value_heads=2,
                                 intermediate_size=896, num_hidden_layers=2, max_position_embeddings=2048,
                                 tie_word_embeddings=False, **common),
        "qwen2": Qwen2Config(hidden_size=384, num_attention_heads=4, num_key_value_heads=1,
                             intermediate_size=1024, num_hidden_layers=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, **common),
    }


def method_config(name: str) -> dict:
    from engine.methods import get_method

    cfg = {"name": name}
    if "r" in get_method(name).config_cls.model_fields:
        cfg["r"] = RANK
    return cfg


def loaded_model(hf_config, seed: int = 0):
    """A LoadedModel with random weights for `hf_config` and the tiny models' tokenizer."""
    from transformers import AutoModelForCausalLM

    from engine.models import LoadedModel, load_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config).float().eval()
    return LoadedModel(model, load_tokenizer("tiny-llama"), "heldout", 0.0)


def run(names: list[str], methods: list[str], workdir: Path, verbose: bool) -> list[dict]:
    rows = []
    for name, hf_config in configs().items():
        if name not in names:
            continue
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(hf_config.to_dict(), default=str))
        loaded = loaded_model(hf_config)
        for m in methods:
            method = method_config(m)
            row = {"model": name, "method": m, "dtype": "fp32", "seq": SEQ, "batch": BATCH}
            try:
                t0 = time.perf_counter()
                est = estimate(str(d), method, batch_size=BATCH, seq_len=SEQ, task="causal_lm", device="cpu").rows
                prep = prepare_for_measure(str(d), method, task="causal_lm", loaded=loaded)
                fw = measure_prepared(prep, batch_size=BATCH, seq_len=SEQ, backward=False)
                sp = step_peak(prep, batch_size=BATCH, seq_len=SEQ)
                del prep
                row["est_rows"] = est
                row["measured"] = fw.rows["hidden_states"]
                row["model_est"] = est["hidden_states"]
                row["model_err"] = pct(est["hidden_states"], fw.rows["hidden_states"])
                row["step"] = {"weights": sp.weights, "gradients": sp.gradients, "optimizer": sp.optimizer,
                               "peak": sp.peak}
                for k in STEP_ROWS:
                    row[f"{k}_err"] = pct(est[k], sp.__dict__[k])
                row["total_err"] = pct(est["total"], sp.peak)
                row["seconds"] = time.perf_counter() - t0
            except Exception as e:     # a method that cannot run on this architecture, etc.
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            if verbose:
                print(fmt(row), flush=True)
            gc.collect()
        del loaded
        gc.collect()
    return rows


def fmt(r: dict) -> str:
    head = f"{r['model']:<8} {r['method']:<17}"
    if "error" in r:
        return f"{head} n/a: {r['error']}"
    worst = max(abs(r[k]) for k in ("model_err", "total_err", *(f"{k}_err" for k in STEP_ROWS)))
    return (f"{head} w {r['weights_err']:+7.2f}% g {r['gradients_err']:+7.2f}% o {r['optimizer_err']:+7.2f}% "
            f"h {r['model_err']:+6.1f}% total {r['est_rows']['total'] / MiB:8.1f} vs {r['step']['peak'] / MiB:8.1f} "
            f"MiB {r['total_err']:+6.1f}%  {'ok' if worst <= TARGET else 'MISS'}  ({r['seconds']:.0f} s)")


def markdown(rows: list[dict], seconds: float) -> str:
    ok = [r for r in rows if "error" not in r]
    hid = [r for r in ok if abs(r["model_err"]) <= TARGET]
    allrows = [r for r in ok if max(abs(r[k]) for k in ("model_err", "total_err", *(f"{k}_err" for k in STEP_ROWS)))
               <= TARGET]
    lines = [
        f"{seconds:.0f} s. Pre-registered grid (see the docstring of `bench/estimator_heldout.py`, committed "
        f"before its first run): tiny random GPT-2 (Conv1D), Mistral (head dim 80, GQA 2:1) and Qwen2 (head dim "
        f"96, GQA 4:1) configs, causal LM, seq {SEQ} x batch {BATCH}, r = {RANK} where a method has a rank, fp32 "
        f"on CPU, estimates with `device='cpu'`. Not used to fit the formula. Target ±{TARGET:.0f}%.",
        "",
        f"- Every row and the total within ±{TARGET:.0f}%: {len(allrows)} of {len(ok)} cases "
        f"({len(rows) - len(ok)} could not run).",
        f"- `hidden_states` within ±{TARGET:.0f}%: {len(hid)} of {len(ok)}.",
        *step_summary(ok),
        "",
        "How each figure is measured: as in `bench/RESULTS-estimator.md` (hidden states: storages autograd saves "
        "in one forward, plus the largest fp32 loss chunk; weights, gradients, optimizer: bytes of the real "
        "tensors in one step; peak: torch's CPU allocator during that step, above the weights and buffers).",
        "",
        *step_table(ok),
    ]
    bad = [r for r in rows if "error" in r]
    if bad:
        lines += ["", "Could not run:", ""] + [f"- {r['model']} {r['method']}: {r['error']}" for r in bad]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2,mistral,qwen2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-estimator-heldout.md")))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    st = Stamp("bench/estimator_heldout.py")
    print(st.header(), flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="heldout-") as tmp:
        rows = run(args.models.split(","), args.methods.split(","), Path(tmp), verbose=True)
    seconds = time.perf_counter() - t0
    ok = [r for r in rows if "error" not in r]
    for line in step_summary(ok):
        print(line)
    if not args.no_write:
        out = st.write("estimator-heldout", markdown(rows, seconds),
                       title="Estimator on a pre-registered held-out grid (GPT-2, Mistral, Qwen2; seq 768 x 2)",
                       path=Path(args.out))
        print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
