"""The Triton kernels (engine/kernels/) against the torch ops they replace, on CUDA.

Each kernel at the shapes of a real step, in bf16 (the precision contract's frozen
base): SmolLM2-135M at 8 x 1024 tokens and Llama-3.2-1B at 4 x 2048; forward +
backward where training runs both. Per case: the median time of the torch ops and
of the kernel (CUDA events, after warm-up), their ratio, the CUDA kernels each
launches per call (torch.profiler), and the largest difference between the two
outputs relative to the largest output (a sanity check: bf16 rounds at 2^-8
relative, and tests/test_triton_kernels.py holds the real tolerances).

Then whole LoRA training steps (r 16 on all seven linears, frozen bf16 base, fp32
LoRA weights, bf16 autocast, the engine's swaps and chunked loss) of random
models of the same two shapes, kernels on against kernels off, alternated over
rounds: the median step time and the peak memory of each.

    .venv/bin/python bench/triton_kernels.py                 # CUDA: bench/RESULTS-kernels.md
    .venv/bin/python bench/triton_kernels.py --dry-run       # CPU: Triton's interpreter, tiny shapes

Needs only torch, triton, transformers and the project (the GPU machine has no
network). `--dry-run` runs the same code on CPU tensors in Triton's interpreter
(STUDIO_TRITON_KERNELS=interpret, set before anything imports triton) with tiny
shapes and writes a temporary file (or `--out`), never bench/RESULTS-kernels.md;
tests/test_triton_kernels.py runs it so this script cannot rot. The exit status is
1 when a case failed (reported as FAILED in the file; the other cases still run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:                  # before torch, engine or peft can import triton
    os.environ["STUDIO_TRITON_KERNELS"] = "interpret"
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stamp import Stamp  # noqa: E402

from engine import fused, kernels  # noqa: E402

# name: (tokens, heads, kv heads, head dim, hidden, ffn, vocab)
SHAPES = {"SmolLM2-135M 8x1024": (8 * 1024, 9, 3, 64, 576, 1536, 49152),
          "Llama-3.2-1B 4x2048": (4 * 2048, 32, 8, 64, 2048, 8192, 128256)}
DRY_SHAPES = {"tiny 2x8": (16, 3, 1, 16, 48, 80, 300)}
LOSS_CHUNK_ROWS = 1024
NF4_SHAPES = {"SmolLM2-135M 8x1024": (1536, 576), "Llama-3.2-1B 4x2048": (8192, 2048)}
# name: (layers, batch, seq) of the step section, with SHAPES' widths
STEPS = {"SmolLM2-135M 8x1024": (30, 8, 1024), "Llama-3.2-1B 4x2048": (16, 4, 2048)}
DRY_STEPS = {"tiny 2x8": (2, 2, 8)}
ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FAILURES: list[str] = []


def median_ms(fn, dev: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cuda_kernels_per_call(fn, dev: torch.device) -> str:
    """Device kernels one call launches (the step is launch-bound: this is the figure)."""
    if dev.type != "cuda":
        return "-"
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(dev)
    return str(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))


def fwd_bwd(fn, inputs, upstream):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, [t for t in inputs if t.requires_grad], upstream)
        return out
    return run


def hf_rms_norm(x, w, eps=1e-5):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def hf_rope(x, cos, sin):
    from transformers.models.llama.modeling_llama import rotate_half
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


class torch_path:
    """Inside: the torch ops (Triton kernels and C kernels off)."""

    def __enter__(self):
        self.mode, self.fused = kernels.set_mode("0"), fused._enabled
        fused.set_enabled(False)

    def __exit__(self, *exc):
        kernels.set_mode(self.mode)
        fused.set_enabled(self.fused)


def cases(shape: tuple, dev: torch.device, dtype: torch.dtype, nf4_shape: tuple):
    """(name, torch fn, kernel fn) per kernel; each fn returns the tensor compared."""
    T, H, KV, D, hidden, ffn, vocab = shape
    K = kernels.ops()
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*size, dt=dtype, grad=False):
        return torch.randn(*size, generator=g, device=dev, dtype=torch.float32).to(dt).requires_grad_(grad)

    x, up = rand(T, hidden, grad=True), rand(T, hidden)
    w = (rand(hidden).abs() + 0.5).detach()
    yield "rms_norm", fwd_bwd(hf_rms_norm, (x, w), up), fwd_bwd(lambda a, b: K.rms_norm(a, b, 1e-5), (x, w), up)
    w32 = (rand(hidden, dt=torch.float32).abs() + 0.5).detach().requires_grad_()
    up32 = rand(T, hidden, dt=torch.float32)
    yield ("rms_norm (weight trains)", fwd_bwd(hf_rms_norm, (x, w32), up32),
           fwd_bwd(lambda a, b: K.rms_norm(a, b, 1e-5), (x, w32), up32))
    batch = 2 if T % 2 == 0 else 1
    S = T // batch
    q, gq = rand(batch, S, H, D, grad=True), rand(batch, S, H, D)
    angles = rand(1, S, D, dt=torch.float32)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    yield ("rope", fwd_bwd(lambda t: hf_rope(t, cos, sin), (q,), gq),
           fwd_bwd(lambda t: K.rope(t, cos, sin), (q,), gq))
    gate, upp, gh = rand(T, ffn, grad=True), rand(T, ffn, grad=True), rand(T, ffn)
    yield ("swiglu", fwd_bwd(lambda a, b: F.silu(a) * b, (gate, upp), gh),
           fwd_bwd(lambda a, b: K.swiglu(a, b), (gate, upp), gh))
    from engine.loss import xent_sum_and_grad_
    rows = min(LOSS_CHUNK_ROWS, T)
    src = rand(rows, vocab, dt=torch.float32) * 4      # the chunked loss's fp32 logits
    work = torch.empty_like(src)
    target = torch.randint(0, vocab, (rows,), generator=g, device=dev)

    def xent():
        work.copy_(src)
        xent_sum_and_grad_(work, target, 1.0 / rows, True)
        return work
    yield "softmax_xent_", xent, xent                   # the same call: the dispatch decides
    from engine.methods import nf4
    qs = nf4.quantize_nf4(rand(*nf4_shape, dt=torch.float32), nf4.BLOCK, True)

    def dequant():
        return nf4.dequantize_nf4(qs, dtype)
    yield "nf4_dequantize", dequant, dequant


def lora_model(shape: tuple, layers: int, seq: int, dev: torch.device, dtype: torch.dtype):
    """A random Llama of `shape`'s widths as the engine trains it: SwiGLU swap, LoRA
    r16 on all seven linears (fp32 weights), fused norm and attention classes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.methods.lora import inject_lora
    from engine.swaps import fuse_swiglu_mlps, use_fused_layers
    _, heads, kv, head_dim, hidden, ffn, vocab = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                      max_position_embeddings=max(seq, 64), tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    fuse_swiglu_mlps(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1]
             in ALL_LINEARS]
    inject_lora(model, names, 16, 32.0)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    use_fused_layers(model)
    return model.train()


def step_section(st: Stamp, label: str, shape: tuple, steps: tuple, dev: torch.device, rounds: int,
                 per_round: int) -> None:
    from engine.loss import compute_loss
    layers, batch, seq = steps
    model = lora_model(shape, layers, seq, dev, torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, shape[-1], (batch, seq), generator=g, device=dev)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = compute_loss(model, data, "causal_lm")
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach().float()

    sides = {"torch ops": "0", "Triton kernels": kernels.mode()}
    times: dict[str, list] = {k: [] for k in sides}
    peaks, losses = {}, {}
    for _ in range(rounds):
        for side, mode in sides.items():
            old = kernels.set_mode(mode)
            try:
                losses[side] = step().item()                # warm-up (and the loss compared)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                times[side].append(median_ms(step, dev, per_round, 1))
                if dev.type == "cuda":
                    peaks[side] = torch.cuda.max_memory_allocated(dev)
            finally:
                kernels.set_mode(old)
    med = {k: statistics.median(v) for k, v in times.items()}
    gib = {k: f"{peaks[k] / 2**30:.2f}" if k in peaks else "-" for k in sides}
    st.say("")
    st.say(f"LoRA r16 all linears, {layers} layers, batch {batch} x seq {seq}, bf16 base, autocast:")
    st.say("")
    st.say("| side | step ms (median) | peak GiB | loss |")
    st.say("|---|---|---|---|")
    for side in sides:
        st.say(f"| {side} | {med[side]:.1f} | {gib[side]} | {losses[side]:.4f} |")
    st.say(f"| ratio (kernels / torch) | {med['Triton kernels'] / med['torch ops']:.2f} | "
           + (f"{peaks['Triton kernels'] / peaks['torch ops']:.2f}" if peaks else "-") + " | |")
    if abs(losses["Triton kernels"] - losses["torch ops"]) > 0.02 * abs(losses["torch ops"]) + 1e-3:
        raise RuntimeError(f"the losses differ: {losses}")
    del model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes, temporary output")
    ap.add_argument("--out", help="where to write (default: bench/RESULTS-kernels.md; dry run: a temp file)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--no-step", action="store_true", help="kernels only, no training-step section")
    a = ap.parse_args(argv)
    official = REPO / "bench" / "RESULTS-kernels.md"
    if a.dry_run:
        out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="kernels-")) / "RESULTS-kernels-dry-run.md"
        if out.resolve() == official.resolve():
            sys.exit("--dry-run never writes bench/RESULTS-kernels.md; give another --out")
        dev, shapes, nf4_shapes, reps, warmup = torch.device("cpu"), DRY_SHAPES, {"tiny 2x8": (64, 96)}, 1, 1
        step_shapes, rounds, per_round = DRY_STEPS, 1, 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device here: run with --dry-run for the CPU check of the same code")
        out = Path(a.out) if a.out else official
        dev, shapes, nf4_shapes, reps, warmup = torch.device("cuda"), SHAPES, NF4_SHAPES, a.reps, 10
        step_shapes, rounds, per_round = STEPS, 3, 5
    if not kernels.applies(torch.ones(1, device=dev)):
        sys.exit(f"the Triton kernels do not apply here: mode {kernels.mode()}, {kernels.unavailable_reason()}")
    st = Stamp("bench/triton_kernels.py" + (" --dry-run" if a.dry_run else ""))
    import triton
    dtype = torch.bfloat16
    st.say(f"triton {triton.__version__}, {dtype}, interpreted: {kernels.interpreted()}, median of {reps} after "
           f"{warmup} warm-up calls. ratio = kernel / torch (below 1: the kernel is faster).")
    for label, shape in shapes.items():
        st.say("")
        st.say(f"## {label}")
        st.say("")
        st.say("| kernel | torch ms | kernel ms | ratio | CUDA kernels torch / ours | max diff / max abs |")
        st.say("|---|---|---|---|---|---|")
        for name, torch_fn, kernel_fn in cases(shape, dev, dtype, nf4_shapes[label]):
            try:
                with torch_path():
                    want = torch_fn().detach().float()
                    t_torch = median_ms(torch_fn, dev, reps, warmup)
                    n_torch = cuda_kernels_per_call(torch_fn, dev)
                got = kernel_fn().detach().float()
                t_ours = median_ms(kernel_fn, dev, reps, warmup)
                n_ours = cuda_kernels_per_call(kernel_fn, dev)
                diff = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
                if not (torch.isfinite(got).all() and diff == diff):
                    raise RuntimeError(f"non-finite output (relative difference {diff})")
                st.say(f"| {name} | {t_torch:.3f} | {t_ours:.3f} | {t_ours / t_torch:.2f} | {n_torch} / {n_ours} "
                       f"| {diff:.3g} |")
            except Exception as exc:                  # one broken case is reported, the rest still run
                traceback.print_exc()
                FAILURES.append(f"{label} {name}: {type(exc).__name__}: {exc}")
                st.say(f"| {name} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | | | | |")
        if not a.no_step:
            try:
                step_section(st, label, shape, step_shapes[label], dev, rounds, per_round)
            except Exception as exc:
                traceback.print_exc()
                FAILURES.append(f"{label} step: {type(exc).__name__}: {exc}")
                st.say(f"step: FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    st.say("")
    st.say("Failed: " + ("; ".join(FAILURES) if FAILURES else "nothing."))
    out.parent.mkdir(parents=True, exist_ok=True)
    print("wrote", st.write("kernels", title="Triton kernels" + (" (dry run, CPU interpreter)" if a.dry_run else ""),
                            path=out))
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
