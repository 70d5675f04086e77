"""The whole CUDA check on one GPU, in one script (issue 17 item 10): run it the day a
GPU is available and commit bench/RESULTS-gpu.md.

Sections, each on `--device` (default cuda) with bf16 autocast, as a run with
`training.precision: bf16` trains (bf16 frozen base, fp32 trainables, bf16 matmuls;
docs/precision.md):

1. engine vs peft: step time (torch.cuda.synchronize around every step, median
   after warm-up, the two sides alternated over `--rounds`) and
   `torch.cuda.max_memory_allocated` (reset per case, cache emptied between cases)
   for SmolLM2 LoRA r=8 (q_proj, v_proj) and QLoRA (our NF4 against peft on
   bitsandbytes' Linear4bit when bitsandbytes is installed; otherwise said so
   and compared with peft's LoRA on the bf16-autocast fp32 base).
2. The estimator's total (`device='cuda'`, dtype bf16 as the studio stores a bf16
   run's estimate, and fp32 beside it) against `max_memory_allocated` of one real
   step of a bf16 run (prepared with `precision: bf16` on the device: frozen weights
   bf16, trainables fp32; our loss under autocast, backward, AdamW step) for EVERY registered method
   (engine.methods.METHODS) at seq 512 x batch 4. max_memory_allocated cannot see
   the CUDA context, so the error is taken against the total without the
   estimator's cuda_context row. A method that refuses the model says why.
3. NF4: quantization and dequantization on the device equal the CPU path
   (engine/methods/nf4.py; on CPU the fused C kernel where it is built).
4. bf16 autocast: a q_proj's output dtype under autocast, the loss beside fp32,
   and a short real run (engine.train.train, `precision: bf16`) with its own
   reported peak.
5. A real run against HF Trainer + peft on a bf16 base (bench/gpu_peers.py): SmolLM2 at
   8 x 1024 and a Llama-3.2-1B shape at 4 x 2048, eager, compiled and QLoRA, with the
   GPU's busy fraction from a profiler trace and the issue's targets marked met or not.

    .venv/bin/python bench/gpu_check.py              # CUDA: writes bench/RESULTS-gpu.md (make gpu-check)
    .venv/bin/python bench/gpu_check.py --dry-run    # CPU, tiny random Llama, temp output

On the GPU machine: a CUDA build of torch (pyproject pins the version; the wheel on
our CPU machines is the CPU one), peft, and optionally bitsandbytes. One broken
section or method is reported as FAILED in the file and the rest still run; the
exit status is 1 when anything failed.

`--dry-run` runs the same functions on the CPU with the random `tiny-llama`, tiny
shapes and few steps; max_memory_allocated is replaced by the CPU measure of
engine.measure (bytes of weights, gradients, saved activations and optimizer
states; for engine vs peft the sampled peak RSS of engine.train.PeakRSS), and the
NF4 "device" path is the torch-ops path with the fused kernels turned off. It
writes to a temporary file (or `--out`), never to bench/RESULTS-gpu.md.
tests/test_gpu_check.py runs it, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from engine_vs_peft import LORA_SMOL, build_model, make_batch  # noqa: E402
from gpu_peers import peers_check  # noqa: E402
from stamp import Stamp  # noqa: E402

MiB = 1 << 20
FAILURES: list[str] = []      # what did not hold (a method that failed, NF4 that differs, a non-finite loss)
FULL = dict(model="smollm2-135m", task="causal_lm", seq=512, batch=4, steps=20, warmup=5, rounds=2,
            run_steps=10, nf4_shapes=[(576, 576), (1536, 576), (4096, 4096), (1000, 37)])
DRY = dict(model="tiny-llama", task="causal_lm", seq=32, batch=2, steps=2, warmup=1, rounds=1,
           run_steps=2, nf4_shapes=[(64, 96), (100, 37)])


# ------------------------------------------------------------------ device helpers

def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def release(dev: torch.device) -> None:
    """Free what the last case left on the GPU: garbage first (a model's reference
    cycles hold device memory), then the CUDA cache. On CPU (dry run) nothing: a
    full collection costs seconds per call there and no figure depends on it."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()


def allocated(dev: torch.device) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


class Peak:
    """The peak memory of the block: CUDA max_memory_allocated (reset on entry);
    on CPU the sampled peak RSS (engine.train.PeakRSS). `kind` names which."""

    def __init__(self, dev: torch.device):
        self.dev, self.peak = dev, 0
        self.kind = "cuda max_memory_allocated" if dev.type == "cuda" else "CPU peak RSS"
        self._rss = None

    def __enter__(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        else:
            from engine.train import PeakRSS
            self._rss = PeakRSS(interval=0.01).__enter__()
        return self

    def __exit__(self, *exc):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.peak = torch.cuda.max_memory_allocated(self.dev)
        else:
            self._rss.__exit__(*exc)
            self.peak = self._rss.peak


def autocast(dev: torch.device):
    return torch.autocast(dev.type, dtype=torch.bfloat16)


def mib(n) -> str:
    return "-" if n is None else f"{n / MiB:.1f}"


# ------------------------------------------------------------------ 1. engine vs peft

def quantize_for_peft(dev: torch.device):
    """A base hook for build_model: the same block linears our QLoRA quantizes
    (engine.methods.qlora.quantizable_names) become bitsandbytes Linear4bit (NF4,
    double quantization, bf16 compute), each weight quantized as it moves to the device."""
    import bitsandbytes as bnb
    from engine.methods.qlora import quantizable_names

    def hook(model):
        for name in quantizable_names(model):
            parent_name, _, child = name.rpartition(".")
            parent, lin = model.get_submodule(parent_name), model.get_submodule(name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                         quant_type="nf4").to(dev)       # Params4bit quantizes on its way to CUDA
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data.clone().to(dev), requires_grad=False)
            setattr(parent, child, q)
        model = model.to(dev)
        model.is_loaded_in_4bit = True      # peft then wraps the Linear4bit layers with its bnb LoRA
        return model
    return hook


def time_side(side: str, case: dict, method: dict, dev: torch.device, steps: int, warmup: int,
              base_hook=None) -> dict:
    """Step times and peak memory of one side on `dev` under bf16 autocast."""
    release(dev)
    before = allocated(dev)
    model, loss_fn = build_model(side, case, method, base_hook=base_hook)
    model.to(dev)
    batch = {k: v.to(dev) for k, v in make_batch(model.config.vocab_size, case["batch"], case["seq"],
                                                 case["task"]).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    with Peak(dev) as pk:
        for _ in range(warmup + steps):
            sync(dev)
            t0 = time.perf_counter()
            with autocast(dev):
                loss = loss_fn(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(dev)
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
    out = {"times": times[warmup:], "peak": pk.peak - before if dev.type == "cuda" else pk.peak,
           "kind": pk.kind, "loss0": losses[0], "finite": all(math.isfinite(x) for x in losses)}
    del model, loss_fn, opt, params, batch, loss
    release(dev)
    return out


def engine_vs_peft(st: Stamp, cfg: dict, dev: torch.device) -> None:
    case = dict(model=cfg["model"], task=cfg["task"], batch=cfg["batch"], seq=cfg["seq"])
    qlora = dict(LORA_SMOL, name="qlora")
    peft_q_hook, peft_q_note = None, ""
    if dev.type == "cuda":
        try:
            import bitsandbytes  # noqa: F401
            peft_q_hook = quantize_for_peft(dev)
        except ImportError:
            peft_q_note = "bitsandbytes is not installed: peft's side is LoRA on the bf16-autocast fp32 base"
    else:
        peft_q_note = "dry run (CPU): bitsandbytes' 4-bit layers need CUDA; peft's side is LoRA on the fp32 base"
    cases = [("LoRA r=8 q,v", LORA_SMOL, None), ("QLoRA r=8 q,v (NF4)", qlora, peft_q_hook)]
    st.say(f"## 1. Engine vs peft, {case['model']}, batch {case['batch']} x {case['seq']}, bf16 autocast")
    st.say()
    st.say(f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up per side and round, {cfg['rounds']} "
           f"round(s) alternating which side goes first; step time = median over all timed steps; memory = "
           f"{Peak(dev).kind} over the steps (CUDA: minus what was allocated before the case), AdamW on both sides.")
    if peft_q_note:
        st.say(f"QLoRA's peft side: {peft_q_note}.")
    st.say()
    st.say("| case | engine step (s) | peft step (s) | time engine/peft | engine peak (MiB) | peft peak (MiB) | "
           "memory engine/peft | first loss engine / peft |")
    st.say("|---|---|---|---|---|---|---|---|")
    for label, method, hook in cases:
        eng, pft = [], []
        for r in range(cfg["rounds"]):
            order = [("engine", method, None), ("peft", LORA_SMOL, hook)]
            for side, meth, h in (order if r % 2 == 0 else order[::-1]):
                try:
                    res = time_side(side, case, meth, dev, cfg["steps"], cfg["warmup"], base_hook=h)
                except Exception as e:          # peft on bitsandbytes is the one untested path: say, go on
                    if side == "peft" and h is not None:
                        st.say(f"(peft QLoRA on bitsandbytes failed: {type(e).__name__}: {str(e)[:200]}; "
                               f"falling back to peft LoRA)")
                        hook = None
                        res = time_side(side, case, LORA_SMOL, dev, cfg["steps"], cfg["warmup"])
                    else:
                        raise
                (eng if side == "engine" else pft).append(res)
        te = statistics.median(t for r in eng for t in r["times"])
        tp = statistics.median(t for r in pft for t in r["times"])
        pe, pp = max(r["peak"] for r in eng), max(r["peak"] for r in pft)
        finite = all(r["finite"] for r in eng + pft)
        if not finite:
            FAILURES.append(f"engine vs peft {label}: a non-finite loss")
        st.say(f"| {label} | {te:.4f} | {tp:.4f} | {te / tp:.2f} | {mib(pe)} | {mib(pp)} | {pe / pp:.2f} | "
               f"{eng[0]['loss0']:.4f} / {pft[0]['loss0']:.4f}{'' if finite else ' (NON-FINITE loss)'} |")
    st.say()


# ------------------------------------------------------------------ 2. estimator vs measured, every method

def measured_step(model, task: str, batch: dict, dev: torch.device, extra_loss=None) -> dict:
    """One step of our training loop on `dev` (loss under bf16 autocast, backward
    outside it, the product's AdamW): CUDA max_memory_allocated over the step, and
    everywhere the CPU measure of engine.measure (tensor bytes of weights,
    gradients, saved activations with the loss's logits chunk, and optimizer states)."""
    from engine.measure import LossChunkProbe, SavedTensorRecorder, optimizer_state_bytes, tensor_bytes
    from engine.optim import make_optimizer
    from engine.train import compute_loss

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt = make_optimizer("adamw", trainable, lr=1e-4)
    model.train()
    with Peak(dev) if dev.type == "cuda" else contextlib.nullcontext() as pk:
        with SavedTensorRecorder(params) as rec, LossChunkProbe(params) as chunk, autocast(dev):
            loss = compute_loss(model, batch, task)
            if extra_loss is not None:
                loss = loss + extra_loss(model)
        saved = rec.total_bytes + chunk.peak         # the loss's largest fp32 logits chunk, as engine.measure
        rec.release()
        loss.backward()
        grads = tensor_bytes(p.grad for p in trainable)
        opt.step()
        states = optimizer_state_bytes(opt)
        opt.zero_grad(set_to_none=True)
    tensors = tensor_bytes(params) + grads + saved + states
    out = {"loss": float(loss.detach()), "tensor_sum": tensors,
           "peak": pk.peak if pk is not None else None}
    del opt, loss
    return out


def estimator_check(st: Stamp, cfg: dict, dev: torch.device) -> None:
    from engine.estimator import estimate
    from engine.measure import prepare_for_measure, synthetic_batch
    from engine.methods import METHODS, get_method
    from engine.models import load_model

    model_name, task, seq, bs = cfg["model"], cfg["task"], cfg["seq"], cfg["batch"]
    measure = "max_memory_allocated over the step minus what was allocated before the model moved there" \
        if dev.type == "cuda" else "the CPU measure (tensor bytes: weights + gradients + saved activations + the " \
                                   "loss's logits chunk + optimizer states), standing in for max_memory_allocated"
    st.say(f"## 2. Estimator total vs one measured step, every method, {model_name}, seq {seq} x batch {bs}")
    st.say()
    st.say(f"Measured: {measure}; one step of our loss under bf16 autocast, backward, AdamW step; every method "
           f"with its default config. Estimate: `estimate(device='cuda', dtype=...)`; total = all rows, "
           f"w/o ctx = total minus the cuda_context row (which max_memory_allocated cannot see); error = "
           f"estimate w/o ctx / measured - 1.")
    st.say()
    st.say("| method | trainable | est. total bf16 (MiB) | est. w/o ctx bf16 | est. w/o ctx fp32 | measured (MiB) | "
           "tensor sum (MiB) | error bf16 | error fp32 | loss |")
    st.say("|---|---|---|---|---|---|---|---|---|---|")
    loaded = load_model(model_name, task)
    vocab = loaded.model.get_input_embeddings().num_embeddings
    within = n = 0
    for name in METHODS:
        method = {"name": name}
        try:
            est = {d: estimate(model_name, method, batch_size=bs, seq_len=seq, dtype=d, task=task, device="cuda")
                   for d in ("bf16", "fp32")}
        except ValueError as e:
            st.say(f"| {name} | refused by the estimator: {str(e).splitlines()[0][:150]} |||||||||")
            continue
        before = allocated(dev)          # the previous case released its memory when it ended
        try:
            # as a bf16 run holds it (docs/precision.md): frozen weights bf16 on the device, trainables fp32;
            # a method that quantizes the base loads it itself, layer by layer
            prep = prepare_for_measure(model_name, method, task=task, precision="bf16", device=dev.type,
                                       loaded=None if get_method(name).quantizes_base else loaded)
        except ValueError as e:
            st.say(f"| {name} | refused by the method: {str(e).splitlines()[0][:150]} |||||||||")
            continue
        try:
            model = prep.model.to(dev)
            batch = synthetic_batch(task, bs, seq, vocab, device=dev)
            m = measured_step(model, task, batch, dev, prep.spec.extra_loss)
        except Exception as e:         # a method that breaks under autocast / on the device: say so, go on
            FAILURES.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
            st.say(f"| {name} | FAILED under bf16 autocast on {dev.type}: {FAILURES[-1]} |||||||||")
            del prep
            release(dev)
            continue
        measured = m["peak"] - before if m["peak"] is not None else m["tensor_sum"]
        wo = {d: e.total - e.rows["cuda_context"] for d, e in est.items()}
        err = {d: 100 * (wo[d] / measured - 1) for d in wo}
        n += 1
        within += abs(err["bf16"]) <= 10
        st.say(f"| {name} | {est['bf16'].n_trainable:,} | {mib(est['bf16'].total)} | {mib(wo['bf16'])} | "
               f"{mib(wo['fp32'])} | {mib(measured)} | {mib(m['tensor_sum'])} | {err['bf16']:+.1f}% | "
               f"{err['fp32']:+.1f}% | {m['loss']:.3f} |")
        del prep, model, batch
        release(dev)
    st.say()
    st.say(f"{within} of {n} measured methods within ±10% (bf16 estimate, without the CUDA context).")
    st.say()


# ------------------------------------------------------------------ 3. NF4 on the device vs the CPU path

@contextlib.contextmanager
def device_path(dev: torch.device):
    """On CUDA nothing to switch; on CPU (dry run) the torch-ops path, the code CUDA
    runs, by turning the fused C kernels off for the block."""
    from engine import fused
    if dev.type == "cuda":
        yield
        return
    was = fused._enabled
    fused.set_enabled(False)
    try:
        yield
    finally:
        fused.set_enabled(was)


def nf4_check(st: Stamp, cfg: dict, dev: torch.device) -> None:
    from engine import fused
    from engine.methods.nf4 import dequantize_nf4, quantize_nf4

    cpu_path = "fused C kernel" if fused.library() is not None and fused._enabled else "torch ops"
    other = "CUDA" if dev.type == "cuda" else "CPU torch ops (dry run)"
    st.say(f"## 3. NF4 on {other} vs the CPU path ({cpu_path})")
    st.say()
    st.say("Random normal weights (std 0.02); codes = packed 4-bit indices and absmax constants of a quantization "
           "on each side; dequant = the CPU-quantized state dequantized on each side (fp32 and bf16).")
    st.say()
    st.say("| shape | double quant | codes equal | absmax equal | dequant fp32 max abs diff | "
           "dequant bf16 max abs diff | equal |")
    st.say("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    all_equal = True
    for shape in cfg["nf4_shapes"]:
        w = torch.randn(shape, generator=g) * 0.02
        for dq in (True, False):
            ref_q = quantize_nf4(w, double_quant=dq)
            ref = {dt: dequantize_nf4(ref_q, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
            with device_path(dev):
                dq_q = quantize_nf4(w.to(dev), double_quant=dq)
                moved = dict(packed=ref_q.packed.to(dev), absmax=ref_q.absmax.to(dev),
                             absmax_scale=None if ref_q.absmax_scale is None else ref_q.absmax_scale.to(dev))
                got = {dt: dequantize_nf4(ref_q, dtype=dt, **moved).cpu() for dt in (torch.float32, torch.bfloat16)}
                sync(dev)
            codes = torch.equal(dq_q.packed.cpu(), ref_q.packed)
            absmax = torch.equal(dq_q.absmax.cpu(), ref_q.absmax) and (
                ref_q.absmax_scale is None or torch.equal(dq_q.absmax_scale.cpu(), ref_q.absmax_scale))
            diff = {dt: float((got[dt].float() - ref[dt].float()).abs().max()) for dt in got}
            ok = codes and absmax and all(d == 0.0 for d in diff.values())
            all_equal &= ok
            st.say(f"| {tuple(shape)} | {dq} | {codes} | {absmax} | {diff[torch.float32]:.3g} | "
                   f"{diff[torch.bfloat16]:.3g} | {'yes' if ok else 'NO'} |")
    st.say()
    st.say(f"NF4 on {other} {'equals' if all_equal else 'DIFFERS FROM'} the CPU path.")
    if not all_equal:
        FAILURES.append("NF4 differs from the CPU path")
    st.say()


# ------------------------------------------------------------------ 4. bf16 autocast

def autocast_check(st: Stamp, cfg: dict, dev: torch.device) -> None:
    from engine.config import parse_run_config
    from engine.estimator import estimate
    from engine.measure import prepare_for_measure, synthetic_batch
    from engine.prepare import prepare_run
    from engine.train import compute_loss, train

    model_name, task = cfg["model"], cfg["task"]
    st.say(f"## 4. bf16 autocast on {dev.type}")
    st.say()
    release(dev)
    prep = prepare_for_measure(model_name, LORA_SMOL, task=task)
    model = prep.model.to(dev).train()
    q = next(m for n, m in model.named_modules() if n.endswith("q_proj"))
    seen = []
    handle = q.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    batch = synthetic_batch(task, cfg["batch"], cfg["seq"], model.get_input_embeddings().num_embeddings, device=dev)
    with torch.no_grad():
        fp32 = float(compute_loss(model, batch, task))
        with autocast(dev):
            bf16 = float(compute_loss(model, batch, task))
    handle.remove()
    st.say(f"- q_proj output dtype without / with autocast: {seen[0]} / {seen[-1]}; loss fp32 {fp32:.5f}, "
           f"bf16 autocast {bf16:.5f} (relative difference {abs(bf16 / fp32 - 1):.2e})")
    del prep, model, batch
    release(dev)
    steps = cfg["run_steps"]
    run = parse_run_config({
        "name": "gpu-check-bf16", "model": model_name, "task": task,
        "dataset": {"name": "demo-instruct", "max_rows": 64}, "method": LORA_SMOL,
        "training": {"max_steps": steps, "batch_size": cfg["batch"], "learning_rate": 1e-3,
                     "max_seq_len": cfg["seq"], "eval_every": 0, "eval_batches": 1, "precision": "bf16", "eval_generate": 0,
                     "device": dev.type}})
    res = train(prepare_run(run))
    est = estimate(model_name, LORA_SMOL, batch_size=cfg["batch"], seq_len=cfg["seq"], dtype="bf16", task=task,
                   device="cuda")
    finite = res.final_loss is not None and math.isfinite(res.final_loss)
    if not finite:
        FAILURES.append("engine.train with precision bf16: a non-finite final loss")
    st.say(f"- engine.train, LoRA, `precision: bf16`, device {res.device}: {res.steps} steps, final loss "
           f"{res.final_loss if res.final_loss is None else round(res.final_loss, 4)} ({'finite' if finite else 'NOT FINITE'}), {res.tokens_per_s:.0f} tokens/s, "
           f"peak {mib(res.peak_memory_bytes)} MiB ({res.memory_kind}); the estimate (bf16, cuda) "
           f"{mib(est.total)} MiB with the CUDA context, {mib(est.total - est.rows['cuda_context'])} MiB without "
           f"(real batches are padded to their longest row, up to {cfg['seq']} tokens)")
    st.say()
    release(dev)


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny random Llama, temporary output")
    ap.add_argument("--out", help="where to write the results (default: bench/RESULTS-gpu.md; dry run: a temp file)")
    ap.add_argument("--sections", default="peft,estimator,nf4,autocast,peers",
                    help="comma-separated subset of peft, estimator, nf4, autocast, peers")
    a = ap.parse_args(argv)
    official = REPO / "bench" / "RESULTS-gpu.md"
    if a.dry_run:
        cfg, dev = DRY, torch.device("cpu")
        out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="gpu-check-")) / "RESULTS-gpu-dry-run.md"
        if out.resolve() == official.resolve():
            sys.exit("--dry-run never writes bench/RESULTS-gpu.md; give another --out")
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device here: run with --dry-run for the CPU check of the same code")
        cfg, dev = FULL, torch.device("cuda")
        out = Path(a.out) if a.out else official
    torch.manual_seed(0)
    t0 = time.perf_counter()
    st = Stamp("bench/gpu_check.py" + (" --dry-run" if a.dry_run else ""))
    print(st.header(), flush=True)
    if a.dry_run:
        st.say("DRY RUN on CPU with the random tiny-llama: these figures check that the code runs, they measure "
               "nothing about a GPU.")
        st.say()
    sections = {"peft": engine_vs_peft, "estimator": estimator_check, "nf4": nf4_check, "autocast": autocast_check,
                "peers": lambda st_, cfg_, dev_: peers_check(st_, FAILURES, a.dry_run, dev_)}
    keys = a.sections.split(",")
    for key in keys:
        if key not in sections:
            sys.exit(f"--sections: unknown {key!r}; choose from {', '.join(sections)}")
    for key in keys:
        t1 = time.perf_counter()
        try:
            sections[key](st, cfg, dev)
        except Exception as e:    # one broken section must not cost the others their GPU time
            traceback.print_exc()
            FAILURES.append(f"section {key}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            st.say(f"**Section {key} FAILED**: {FAILURES[-1]}")
            release(dev)
        st.say(f"_({key}: {time.perf_counter() - t1:.0f} s)_")
        st.say()
        # the file so far, after every section: a device call cut short still brings back what it measured
        st.write("gpu", title="GPU check (partial: running)" + (" (dry run)" if a.dry_run else ""), path=out)
    st.say(f"Whole check: {time.perf_counter() - t0:.0f} s on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}.")
    st.say("Failed: " + ("; ".join(FAILURES) if FAILURES else "nothing") + ".")
    print("wrote", st.write("gpu", title="GPU check" + (" (dry run)" if a.dry_run else ""), path=out))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
