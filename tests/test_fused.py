"""engine.fused: the C kernels give torch's values and gradients (checked against
float64 references), the layers that use them keep names, logits, gradients and
saved bytes, and a machine without a compiler falls back to torch ops."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import fused
from engine.swaps import fuse_swiglu_mlps, use_fused_layers
from engine.measure import SavedTensorRecorder
from engine.models import load_model

ROOT = Path(__file__).resolve().parent.parent

if fused.library() is None:    # a C compiler is part of every supported machine: a failure, never a skip
    pytest.fail(f"the fused kernels did not build: {fused.unavailable_reason()}", pytrace=False)


def hf_rms_norm(x, w, eps):
    xf = x.float() if x.dtype != torch.float64 else x
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def grads(fn, inputs, upstream):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, [t for t in inputs if t.requires_grad], upstream)


@pytest.mark.parametrize("shape", [(3, 5, 24), (1, 7), (64, 576)])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_rms_norm_matches_float64_in_values_and_gradients(shape, weight_trains):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = (torch.rand(shape[-1], generator=g) + 0.5).requires_grad_(weight_trains)
    up = torch.randn(*shape, generator=g)
    out, got = grads(lambda a, b: fused.rms_norm(a, b, 1e-5), (x, w), up)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(weight_trains)
    ref, want = grads(lambda a, b: hf_rms_norm(a, b, 1e-5), (x64, w64), up.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert len(got) == len(want) == (2 if weight_trains else 1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_swiglu_matches_float64_in_values_and_gradients(needs):
    g = torch.Generator().manual_seed(1)
    gate = (torch.randn(4, 9, 40, generator=g) * 4).requires_grad_(needs[0])
    up = torch.randn(4, 9, 40, generator=g).requires_grad_(needs[1])
    upstream = torch.randn(4, 9, 40, generator=g)
    out, got = grads(fused.swiglu, (gate, up), upstream)
    g64, u64 = gate.detach().double().requires_grad_(needs[0]), up.detach().double().requires_grad_(needs[1])
    ref, want = grads(lambda a, b: F.silu(a) * b, (g64, u64), upstream.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert len(got) == len(want) == sum(needs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_swiglu_exp_holds_over_the_whole_float_range():
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor([0.0, 1e-30, -1e-30, 88.5, -88.5, 1e4, -1e4])])
    got = fused.swiglu(x, torch.ones_like(x)).double()
    ref = F.silu(x.double())
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-30)
    assert torch.isnan(fused.swiglu(torch.tensor([float("nan")]), torch.ones(1))).all()


@pytest.mark.parametrize("kv_heads,cos_batch", [(3, 2), (1, 1)])
def test_rope_matches_transformers_in_values_and_gradients(kv_heads, cos_batch):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    g = torch.Generator().manual_seed(2)
    B, S, H, D = 2, 7, kv_heads, 16
    x = torch.randn(B, S, H, D, generator=g, requires_grad=True)
    angles = torch.randn(cos_batch, S, D, generator=g)
    cos, sin = angles.cos(), angles.sin()
    upstream = torch.randn(B, S, H, D, generator=g)
    out, (got,) = grads(lambda t: fused.rope(t, cos, sin), (x,), upstream)
    x64 = x.detach().double().requires_grad_()

    def reference(t):
        return apply_rotary_pos_emb(t.transpose(1, 2), t.transpose(1, 2), cos.double(), sin.double())[0].transpose(1, 2)
    ref, (want,) = grads(reference, (x64,), upstream.double())
    assert out.is_contiguous() and out.shape == x.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rope: inputs of shape"):
        fused.rope(x[..., :15], cos, sin)


@pytest.mark.parametrize("grad", [True, False])
def test_softmax_xent_matches_cross_entropy_and_its_gradient(grad):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 1000, generator=g) * 5
    logits[2, 7] = 80.0                                        # a dominant logit stays finite
    target = torch.randint(0, 1000, (6,), generator=g)
    ref_in = logits.double().requires_grad_()
    ref = F.cross_entropy(ref_in, target, reduction="none")
    (ref.sum() * 0.25).backward()
    work = logits.clone()
    loss = fused.softmax_xent_(work, target, 0.25, grad)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    if grad:
        torch.testing.assert_close(work.double(), ref_in.grad, rtol=1e-5, atol=1e-7)
    else:
        assert torch.equal(work, logits)                      # untouched without a gradient
    with pytest.raises(ValueError, match="outside"):
        fused.softmax_xent_(logits.clone(), torch.tensor([0, 1, 2, 3, 4, 1000]), 1.0, True)


def tiny_llama():
    return load_model("tiny-llama", "causal_lm").model.float()


def test_fused_layers_keep_names_logits_gradients_and_saved_bytes():
    torch.manual_seed(0)
    model = tiny_llama()
    fuse_swiglu_mlps(model)                                    # on both: the comparison is of the norms and RoPE
    ref = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    norm_types = {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}
    n = use_fused_layers(model)
    layers = model.config.num_hidden_layers
    assert n == 2 * layers + 1 + layers                        # two norms per block, the final norm, attention
    assert use_fused_layers(model) == 0                        # idempotent
    assert [n for n, _ in model.named_parameters()] == names
    assert {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__} == norm_types
    for m in (model, ref):
        for name, p in m.named_parameters():
            p.requires_grad_("q_proj" in name or "v_proj" in name)   # frozen norms, as under LoRA
    ids = torch.randint(5, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with SavedTensorRecorder([p for p in model.parameters()]) as ours:
        out = model(input_ids=ids).logits
    with SavedTensorRecorder([p for p in ref.parameters()]) as theirs:
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert ours.total_bytes == theirs.total_bytes               # the same tensors kept for backward
    out.square().mean().backward()
    want.square().mean().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_layers_are_used_in_training_and_off_switch_returns_to_torch_ops():
    from torch.profiler import ProfilerActivity, profile
    model = tiny_llama()
    use_fused_layers(model)
    fuse_swiglu_mlps(model)
    for name, p in model.named_parameters():
        p.requires_grad_("q_proj" in name)
    ids = torch.randint(5, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))

    def ops():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=ids).logits.sum().backward()
        return {e.key for e in prof.key_averages()}
    assert {"_RMSNorm", "_RoPE", "_SwiGLU"} <= ops()
    fused.set_enabled(False)
    try:
        assert not {"_RMSNorm", "_RoPE", "_SwiGLU"} & ops()
    finally:
        fused.set_enabled(True)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300,
                          cwd=ROOT)


PROBE = """
import json, warnings, torch
warnings.simplefilter("always")
from engine import fused
with warnings.catch_warnings(record=True) as caught:
    ok = fused.applies(torch.ones(3))
    x = torch.randn(2, 8, requires_grad=True)
    y = fused.rms_norm(x, torch.ones(8), 1e-6) if ok else None
print(json.dumps({"applies": ok, "reason": fused.unavailable_reason(),
                  "warnings": [str(w.message) for w in caught]}))
"""


def test_no_compiler_means_torch_ops_and_one_clear_warning(tmp_path):
    done = run_python(PROBE, CC=str(tmp_path / "no-such-cc"), STUDIO_KERNEL_CACHE=str(tmp_path / "k"))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["applies"] is False and out["reason"]
    assert len(out["warnings"]) == 1 and "using torch ops" in out["warnings"][0]
    assert not list((tmp_path / "k").glob("*.so"))             # nothing half-built left behind


def test_kernels_build_once_into_the_cache_and_the_switch_skips_them(tmp_path):
    cache = tmp_path / "kernels"
    first = run_python(PROBE, STUDIO_KERNEL_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["applies"] is True
    built = list(cache.glob("fused-*.so"))
    assert len(built) == 1 and not [p for p in cache.iterdir() if p not in built]
    stamp = built[0].stat().st_mtime_ns
    again = run_python(PROBE, STUDIO_KERNEL_CACHE=str(cache))
    assert json.loads(again.stdout.strip().splitlines()[-1])["applies"] is True
    assert built[0].stat().st_mtime_ns == stamp               # loaded, not rebuilt
    off = run_python(PROBE, STUDIO_FUSED_KERNELS="0", STUDIO_KERNEL_CACHE=str(tmp_path / "unused"))
    assert json.loads(off.stdout.strip().splitlines()[-1]) == {"applies": False, "reason": None, "warnings": []}
    bad = run_python(PROBE, STUDIO_FUSED_KERNELS="sometimes")
    assert bad.returncode != 0 and "STUDIO_FUSED_KERNELS='sometimes'" in bad.stderr


@pytest.mark.parametrize("shape", [(96, 64), (7, 9), (3, 65)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_dequantize_is_bit_identical_to_the_torch_path(shape, double_quant):
    from engine.methods import nf4
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    qs = nf4.quantize_nf4(w, nf4.BLOCK, double_quant)
    got = nf4.dequantize_nf4(qs)
    fused.set_enabled(False)
    try:
        want = nf4.dequantize_nf4(qs)
    finally:
        fused.set_enabled(True)
    assert got.shape == want.shape == w.shape and torch.equal(got, want)
    assert (got - w).abs().max() > 0                           # it is the quantized weight, not a copy
    with pytest.raises(ValueError, match="nf4_dequantize"):
        fused.nf4_dequantize(qs.packed, nf4.nf4_code(), torch.ones(0), qs.numel, nf4.BLOCK)
