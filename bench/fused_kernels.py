"""The fused C kernels (engine/fused.py) against the torch ops they replace.

Each kernel at SmolLM2-135M's shapes for batch 4 x 128 (forward + backward where
training runs both), median of 50 calls after warm-up, then one SmolLM2 LoRA
training step with the kernels on and off (same process, alternating, 5 each).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/fused_kernels.py [--no-step]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stamp import Stamp  # noqa: E402

from engine import fused  # noqa: E402

T, H, KV, D, HIDDEN, FFN, VOCAB = 512, 9, 3, 64, 576, 1536, 49152


def median_ms(fn, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def fwd_bwd(fn, inputs, upstream):
    def run():
        torch.autograd.grad(fn(*inputs), [t for t in inputs if t.requires_grad], upstream)
    return run


def torch_rms_norm(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype)


def torch_rope(x, cos, sin):
    from transformers.models.llama.modeling_llama import rotate_half
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]


def torch_xent(logits, y):
    logits = logits.clone()
    picked = logits.gather(1, y[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    e = logits.sub_(top).exp_()
    sums = e.sum(dim=-1, keepdim=True)
    loss = top.squeeze(1) + sums.log().squeeze(1) - picked
    e.div_(sums)
    e[torch.arange(e.shape[0]), y] -= 1.0
    return loss


def kernel_rows() -> list[tuple[str, float, float]]:
    from engine.methods import nf4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, HIDDEN, generator=g, requires_grad=True)
    w = torch.rand(HIDDEN, generator=g) + 0.5
    gate = torch.randn(4, 128, FFN, generator=g, requires_grad=True)
    up = torch.randn(4, 128, FFN, generator=g, requires_grad=True)
    q = torch.randn(4, 128, H, D, generator=g, requires_grad=True)
    ang = torch.randn(1, 128, D, generator=g)
    cos, sin = ang.cos(), ang.sin()
    logits = torch.randn(T, VOCAB, generator=g)
    y = torch.randint(0, VOCAB, (T,), generator=g)
    qs = nf4.quantize_nf4(torch.randn(FFN, HIDDEN, generator=g))
    cases = [
        ("RMSNorm fwd+bwd 512x576", fwd_bwd(torch_rms_norm, (x, w), torch.randn_like(x)),
         fwd_bwd(lambda a, b: fused.rms_norm(a, b, 1e-5), (x, w), torch.randn_like(x))),
        ("SwiGLU fwd+bwd 512x1536", fwd_bwd(lambda a, b: F.silu(a) * b, (gate, up), torch.randn_like(gate)),
         fwd_bwd(fused.swiglu, (gate, up), torch.randn_like(gate))),
        ("RoPE q fwd+bwd 512x9x64", fwd_bwd(lambda a: torch_rope(a, cos, sin), (q,), torch.randn_like(q)),
         fwd_bwd(lambda a: fused.rope(a, cos, sin), (q,), torch.randn_like(q))),
        ("CE loss+grad 512x49152", lambda: torch_xent(logits, y),
         lambda: fused.softmax_xent_(logits.clone(), y, 1.0, True)),
    ]
    rows = []
    for label, ref, ours in cases:
        rows.append((label, median_ms(ref), median_ms(ours)))
    fused.set_enabled(False)
    ref_ms = median_ms(lambda: nf4.dequantize_nf4(qs))
    fused.set_enabled(True)
    rows.append(("NF4 dequantize 1536x576", ref_ms, median_ms(lambda: nf4.dequantize_nf4(qs))))
    return rows


def step_times(rounds: int = 5) -> tuple[float, float]:
    import engine_vs_peft as B
    step, model = B.build("engine", B.SMOL, B.LORA_SMOL)
    batch = B.make_batch(model.config.vocab_size, 4, 128, "causal_lm")
    for _ in range(3):
        step(batch)
    on, off = [], []
    for i in range(rounds):
        for enabled in ((True, False) if i % 2 == 0 else (False, True)):
            fused.set_enabled(enabled)
            step(batch)
            (on if enabled else off).append(step(batch))
    fused.set_enabled(True)
    return statistics.median(on), statistics.median(off)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-step", action="store_true", help="skip the SmolLM2 training-step comparison")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS-fused.md")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if fused.library() is None:
        sys.exit(f"no fused kernels here: {fused.unavailable_reason()}")
    st = Stamp("bench/fused_kernels.py")
    print(st.header(), flush=True)
    st.say(f"threads {torch.get_num_threads()}; median of 50 calls")
    st.say()
    st.say("| kernel | torch ops (ms) | fused (ms) | fused / torch |")
    st.say("|---|---|---|---|")
    for label, ref, ours in kernel_rows():
        st.say(f"| {label} | {ref:.3f} | {ours:.3f} | {ours / ref:.2f} |")
    if not a.no_step:
        on, off = step_times()
        st.say()
        st.say(f"SmolLM2 LoRA r=8 step, 4 x 128, same process: fused on {on:.3f} s, off {off:.3f} s "
               f"({on / off:.2f}x)")
    if not a.no_write:
        print("wrote", st.write("fused", title="Fused C kernels vs torch ops"))


if __name__ == "__main__":
    main()
