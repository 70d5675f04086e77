"""engine.kernels: the Triton kernels against the torch ops they replace (values and
gradients, fp32 and bf16, odd sizes), NF4 dequantization bit for bit the CPU path's,
what each keeps for backward, and a tiny-llama LoRA / QLoRA training step through
the dispatch (swaps, chunked loss, NF4 layers) equal to the torch ops.

No GPU here: the kernels run on CPU tensors in Triton's interpreter. It must be
switched on before anything imports triton (peft does, through torch._dynamo), so
the main test process runs this file again in a subprocess with
STUDIO_TRITON_KERNELS=interpret, where the kernel tests themselves run:

    STUDIO_TRITON_KERNELS=interpret TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_triton_kernels.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import fused, kernels

REPO = Path(__file__).resolve().parents[1]
INNER = kernels.mode() == "interpret"


def run_inner(*selection: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, STUDIO_TRITON_KERNELS="interpret", TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(Path(__file__)), *selection], capture_output=True, text=True, env=env,
                          timeout=540, cwd=REPO)     # inside pytest-timeout's 600 s, to say why


# ---- in the main process ---------------------------------------------------------------------

if not INNER:
    from conftest import require

    def test_kernels_in_the_triton_interpreter():
        """Every test below, in a process where the interpreter is on (see the docstring)."""
        require("triton")
        done = run_inner()
        assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
        assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-2000:]

    def test_cpu_tensors_never_take_the_kernels_unless_interpreting():
        x = torch.randn(4, 8)
        assert kernels.mode() == "1" and not kernels.applies(x)   # CPU tensors: the C kernels / torch ops
        old = kernels.set_mode("0")
        try:
            assert not kernels.applies(x)
        finally:
            kernels.set_mode(old)
        with pytest.raises(ValueError, match="is not one of"):
            kernels.set_mode("sometimes")

    def test_the_switch_is_read_from_the_environment_and_a_bad_value_is_refused():
        code = "from engine import kernels; print(kernels.mode())"
        for raw, want in (("0", "0"), ("off", "0"), ("1", "1"), ("interpret", "interpret")):
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                                  env=dict(os.environ, STUDIO_TRITON_KERNELS=raw), timeout=120)
            assert done.returncode == 0 and done.stdout.strip() == want, done.stderr
        bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                             env=dict(os.environ, STUDIO_TRITON_KERNELS="sometimes"), timeout=120)
        assert bad.returncode != 0 and "STUDIO_TRITON_KERNELS='sometimes'" in bad.stderr

    def test_interpreting_after_triton_was_imported_compiled_says_why():
        code = ("import os, warnings, torch, triton.language\n"
                "os.environ['STUDIO_TRITON_KERNELS'] = 'interpret'; os.environ.pop('TRITON_INTERPRET', None)\n"
                "from engine import kernels\n"
                "with warnings.catch_warnings(record=True) as w:\n"
                "    warnings.simplefilter('always')\n"
                "    print(kernels.applies(torch.ones(2)), kernels.unavailable_reason(), len(w))\n")
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STUDIO_TRITON_KERNELS")}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("False triton was imported before TRITON_INTERPRET=1"), done.stdout
        assert done.stdout.strip().endswith(" 1")                   # one warning

    def test_nf4_never_divides_by_a_python_number():
        """CUDA computes tensor / number as tensor * (1 / number), rounded: 126 of the 256
        absmax codes then land one ulp away from the CPU's true division, and the NF4 codes
        chosen against them differ. Quantization and dequantization divide by tensors only."""
        from torch.overrides import TorchFunctionMode

        from engine.methods import nf4

        class ScalarDivisions(TorchFunctionMode):
            def __init__(self):
                super().__init__()
                self.seen = []

            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in ("div", "div_", "true_divide", "__truediv__", "__itruediv__") and len(args) > 1 \
                        and isinstance(args[1], (int, float)):
                    self.seen.append(name)
                return func(*args, **(kwargs or {}))

        w = torch.randn(33, 70, generator=torch.Generator().manual_seed(0))
        old = fused._enabled
        fused.set_enabled(False)                                   # the torch path: all of it is torch ops
        try:
            with ScalarDivisions() as mode:
                for dq in (True, False):
                    nf4.dequantize_nf4(nf4.quantize_nf4(w, nf4.BLOCK, dq))
        finally:
            fused.set_enabled(old)
        assert mode.seen == []
        # and the division by a tensor is the correctly rounded one, as before on CPU
        q = torch.arange(256, dtype=torch.float32)
        assert torch.equal(nf4._exact_div(q, 255.0), q / 255.0)
        assert not torch.equal(q * torch.tensor(1 / 255.0), q / 255.0)   # the reciprocal is not

    def hopper_builds():
        """(kernel, signature, constexprs, warps) of every kernel in the variants the
        engine launches: bf16 activations, fp32 master weights and logits, fp32 NF4."""
        from engine.kernels import nf4_dequant, rms_norm, rope, swiglu, xent
        p = lambda dt: "*" + dt                       # noqa: E731
        return [
            (rms_norm._rms_norm_fwd, dict(x_ptr=p("bf16"), w_ptr=p("fp32"), y_ptr=p("fp32"), rstd_ptr=p("fp32"),
                                          cols="i32", eps="fp32"), dict(BLOCK=1024), 4),
            (rms_norm._rms_norm_bwd, dict(g_ptr=p("bf16"), x_ptr=p("bf16"), w_ptr=p("bf16"), rstd_ptr=p("fp32"),
                                          dx_ptr=p("bf16"), dw_ptr=p("fp32"), rows="i32", cols="i32"),
             dict(HAS_DX=True, HAS_DW=True, BLOCK=2048), 8),
            (rope._rope_kernel, dict(x_ptr=p("bf16"), cos_ptr=p("fp32"), sin_ptr=p("fp32"), out_ptr=p("bf16"),
                                     heads="i32", dim="i32", cos_rows="i32"),
             dict(BACKWARD=True, BLOCK_H=16, BLOCK_D=32), 2),
            (swiglu._swiglu_fwd, dict(g_ptr=p("bf16"), u_ptr=p("bf16"), h_ptr=p("bf16"), n="i32"),
             dict(BLOCK=1024), 4),
            (swiglu._swiglu_bwd, dict(dh_ptr=p("bf16"), g_ptr=p("bf16"), u_ptr=p("bf16"), dg_ptr=p("bf16"),
                                      du_ptr=p("bf16"), n="i32"), dict(HAS_DG=True, HAS_DU=True, BLOCK=1024), 4),
            (xent._xent_kernel, dict(logits_ptr=p("fp32"), target_ptr=p("i64"), loss_ptr=p("fp32"), vocab="i32",
                                     scale="fp32"), dict(GRAD=True, BLOCK=4096), 8),
            # the other branches of each kernel's constexpr switches, and fp16
            (rms_norm._rms_norm_fwd, dict(x_ptr=p("fp16"), w_ptr=p("fp16"), y_ptr=p("fp16"), rstd_ptr=p("fp32"),
                                          cols="i32", eps="fp32"), dict(BLOCK=8192), 16),
            (rms_norm._rms_norm_bwd, dict(g_ptr=p("fp32"), x_ptr=p("fp32"), w_ptr=p("fp32"), rstd_ptr=p("fp32"),
                                          dx_ptr=p("fp32"), dw_ptr=p("fp32"), rows="i32", cols="i32"),
             dict(HAS_DX=True, HAS_DW=False, BLOCK=1024), 4),
            (rope._rope_kernel, dict(x_ptr=p("fp16"), cos_ptr=p("fp16"), sin_ptr=p("fp16"), out_ptr=p("fp16"),
                                     heads="i32", dim="i32", cos_rows="i32"),
             dict(BACKWARD=False, BLOCK_H=32, BLOCK_D=64), 4),
            (swiglu._swiglu_bwd, dict(dh_ptr=p("fp32"), g_ptr=p("fp32"), u_ptr=p("fp32"), dg_ptr=p("fp32"),
                                      du_ptr=p("fp32"), n="i32"), dict(HAS_DG=False, HAS_DU=True, BLOCK=1024), 4),
            (xent._xent_kernel, dict(logits_ptr=p("bf16"), target_ptr=p("i64"), loss_ptr=p("fp32"), vocab="i32",
                                     scale="fp32"), dict(GRAD=False, BLOCK=1024), 4),
            (nf4_dequant._nf4_kernel, dict(packed_ptr=p("u8"), code_ptr=p("fp32"), absmax_ptr=p("fp32"),
                                           scale_ptr=p("fp32"), out_ptr=p("bf16"), numel="i32"),
             dict(QBLOCK=64, DQ_BLOCK=1, DOUBLE_QUANT=False, BLOCK=1024), 4),
            # last: the one whose PTX is read
            (nf4_dequant._nf4_kernel, dict(packed_ptr=p("u8"), code_ptr=p("fp32"), absmax_ptr=p("u8"),
                                           scale_ptr=p("fp32"), out_ptr=p("fp32"), numel="i32"),
             dict(QBLOCK=64, DQ_BLOCK=256, DOUBLE_QUANT=True, BLOCK=1024), 4),
        ]

    def test_every_kernel_compiles_for_a_hopper_gpu(tmp_path, monkeypatch):
        """The interpreter runs the kernels' Python; this runs Triton's compiler on them,
        down to PTX and a cubin for sm_90 (the H200), as the GPU will. And NF4's PTX
        divides with IEEE rounding (`/` in Triton is div.approx) and fuses no FMA, the
        two things its bit-for-bit equality with the CPU rests on."""
        require("triton")
        import re

        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
        monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")          # what triton 3.6 does by default
        for kernel, signature, constexprs, warps in hopper_builds():
            assert isinstance(kernel, JITFunction), f"{kernel}: TRITON_INTERPRET is set in this process"
            signature = {**signature, **{name: "constexpr" for name in constexprs}}
            assert list(signature) == kernel.arg_names, kernel.__name__
            built = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                   target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
            assert built.asm["cubin"], kernel.__name__
        ptx = built.asm["ptx"]                                         # the NF4 kernel's, the last one
        ops = set(re.findall(r"^\s*((?:div|fma|rcp)\.[\w.]+)", ptx, re.M))
        assert "div.rn.f32" in ops and not {o for o in ops if o.startswith(("fma", "rcp"))}, ops
        assert not {o for o in ops if o.startswith(("div.approx", "div.full"))}, ops

    def test_kernel_bench_dry_run_runs_every_kernel_on_cpu(tmp_path):
        require("triton")
        out = tmp_path / "kernels.md"
        done = subprocess.run([sys.executable, str(REPO / "bench" / "triton_kernels.py"), "--dry-run",
                               "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                              env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        text = out.read_text()
        assert text.startswith("commit ") and "# Triton kernels (dry run" in text
        for name in ("rms_norm", "rms_norm (weight trains)", "rope", "swiglu", "softmax_xent_", "nf4_dequantize"):
            row = next((r for r in text.splitlines() if r.startswith(f"| {name} |")), None)
            assert row is not None, f"no row for {name}: {text}"
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert float(cells[1]) > 0 and float(cells[2]) > 0 and float(cells[-1]) < 0.03, row
        assert "Failed: nothing." in text


# ---- in the interpreter (the subprocess) -------------------------------------------------------

def hf_rms_norm(x, w, eps):
    """transformers' LlamaRMSNorm.forward."""
    xf = x.float() if x.dtype != torch.float64 else x
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def grads(fn, inputs, upstream):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, [t for t in inputs if t.requires_grad], upstream)


def tol(dtype):
    # fp32: a few ulps of the fp32 result; bf16: about two bf16 ulps (eps 2^-8)
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def saved_bytes(fn, *inputs, params=()) -> int:
    """Bytes autograd keeps for backward of fn(*inputs), not counting `params`."""
    from engine.measure import SavedTensorRecorder
    with SavedTensorRecorder(list(params)) as rec:
        fn(*inputs)
    return rec.total_bytes


if INNER:
    K = kernels.ops()

    def test_the_kernels_run_in_the_interpreter_on_cpu_tensors():
        assert kernels.interpreted() is True and kernels.applies(torch.ones(3))
        assert kernels.applies(torch.ones(3, dtype=torch.bfloat16), torch.ones(3))
        assert not kernels.applies(torch.ones(3, dtype=torch.float64))
        assert not kernels.applies(torch.ones(0))
        sub = type("Sharded", (torch.Tensor,), {})
        assert not kernels.applies(torch.ones(3).as_subclass(sub))   # e.g. a DTensor: its storage is not the tensor

    def test_regions_torch_compile_traces_keep_torch_ops():
        def f(t):
            return t + 1 if kernels.applies(t) else t - 1
        x = torch.zeros(3)
        assert f(x).tolist() == [1, 1, 1]
        assert torch.compile(f, backend="eager", fullgraph=True)(x).tolist() == [-1, -1, -1]

    @pytest.mark.parametrize("shape", [(3, 5, 24), (7, 100), (2, 3, 576)])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("weight_trains", [False, True])
    def test_rms_norm_matches_llama_in_values_and_gradients(shape, dtype, weight_trains):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(*shape, generator=g) * 3).to(dtype).requires_grad_()
        # a training weight is an fp32 master weight beside bf16 activations (mixed precision)
        w = (torch.rand(shape[-1], generator=g) + 0.5).to(torch.float32 if weight_trains else dtype)
        w.requires_grad_(weight_trains)
        up = torch.randn(*shape, generator=g).to(torch.promote_types(dtype, w.dtype))
        out, got = grads(lambda a, b: K.rms_norm(a, b, 1e-5), (x, w), up)
        assert out.dtype == torch.promote_types(dtype, w.dtype)
        torch.testing.assert_close(out, hf_rms_norm(x.detach(), w.detach(), 1e-5), **tol(dtype))
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_(weight_trains)
        ref, want = grads(lambda a, b: hf_rms_norm(a, b, 1e-5), (x64, w64), up.double())
        assert len(got) == len(want) == (2 if weight_trains else 1)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, **tol(dtype))
        assert got[0].dtype == dtype and (not weight_trains or got[1].dtype == w.dtype)

    def test_rms_norm_weight_gradient_alone():
        """ln_tuning's first norm: the input (the embeddings' output) needs no gradient."""
        g = torch.Generator().manual_seed(5)
        x = torch.randn(37, 48, generator=g)                   # rows: not a multiple of the 4 programs
        w = (torch.rand(48, generator=g) + 0.5).requires_grad_()
        up = torch.randn(37, 48, generator=g)
        _, (got,) = grads(lambda a, b: K.rms_norm(a, b, 1e-6), (x, w), up)
        _, (want,) = grads(lambda a, b: hf_rms_norm(a, b, 1e-6), (x.double(), w.detach().double().requires_grad_()),
                           up.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    def test_rms_norm_keeps_its_input_and_one_fp32_rstd_per_row():
        x = torch.randn(6, 40, dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(40, dtype=torch.bfloat16)
        assert saved_bytes(lambda a: K.rms_norm(a, w, 1e-6), x, params=[w]) == x.numel() * 2 + 6 * 4
        with pytest.raises(ValueError, match="rms_norm: weight of shape"):
            K.rms_norm(x, torch.ones(39), 1e-6)
        with pytest.raises(ValueError, match="rms_norm: x: dtype torch.float64"):
            K.rms_norm(x.double(), w, 1e-6)

    @pytest.mark.parametrize("dtype,cos_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)])
    @pytest.mark.parametrize("heads,cos_batch", [(3, 2), (1, 1)])
    def test_rope_matches_transformers_in_values_and_gradients(dtype, cos_dtype, heads, cos_batch):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        g = torch.Generator().manual_seed(2)
        B, S, D = 2, 7, 24                                     # half a head (12) is not a power of two
        x = torch.randn(B, S, heads, D, generator=g).to(dtype).requires_grad_()
        angles = torch.randn(cos_batch, S, D, generator=g)
        cos, sin = angles.cos().to(cos_dtype), angles.sin().to(cos_dtype)
        upstream = torch.randn(B, S, heads, D, generator=g).to(dtype)
        out, (got,) = grads(lambda t: K.rope(t, cos, sin), (x,), upstream)

        def reference(t):
            return apply_rotary_pos_emb(t.transpose(1, 2), t.transpose(1, 2), cos.double(),
                                        sin.double())[0].transpose(1, 2)
        x64 = x.detach().double().requires_grad_()
        ref, (want,) = grads(reference, (x64,), upstream.double())
        assert out.dtype == dtype and out.is_contiguous() and out.shape == x.shape
        torch.testing.assert_close(out.double(), ref, **tol(dtype))
        torch.testing.assert_close(got.double(), want, **tol(dtype))
        assert saved_bytes(lambda t: K.rope(t, cos, sin), x) == 2 * cos.numel() * cos.element_size()
        with pytest.raises(ValueError, match="rope: inputs of shape"):
            K.rope(x[..., :23], cos, sin)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
    def test_swiglu_matches_silu_times_up_and_keeps_gate_and_up_only(dtype, needs):
        g = torch.Generator().manual_seed(1)
        gate = (torch.randn(3, 5, 401, generator=g) * 4).to(dtype).requires_grad_(needs[0])   # 6015: not 1024s
        up = torch.randn(3, 5, 401, generator=g).to(dtype).requires_grad_(needs[1])
        upstream = torch.randn(3, 5, 401, generator=g).to(dtype)
        out, got = grads(K.swiglu, (gate, up), upstream)
        g64, u64 = gate.detach().double().requires_grad_(needs[0]), up.detach().double().requires_grad_(needs[1])
        ref, want = grads(lambda a, b: F.silu(a) * b, (g64, u64), upstream.double())
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, **tol(dtype))
        assert len(got) == len(want) == sum(needs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b, **tol(dtype))
        one = gate.numel() * gate.element_size()
        assert saved_bytes(K.swiglu, gate, up) == (2 if needs[0] else 1) * one

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("grad", [True, False])
    def test_softmax_xent_matches_cross_entropy_and_its_gradient(dtype, grad):
        g = torch.Generator().manual_seed(3)
        vocab = 5003                                           # more than one block of 4096, not a multiple
        logits = (torch.randn(6, vocab, generator=g) * 5).to(dtype)
        logits[2, 7] = 80.0                                    # a dominant logit stays finite
        target = torch.randint(0, vocab, (6,), generator=g)
        target[2] = 7
        ref_in = logits.double().requires_grad_()
        ref = F.cross_entropy(ref_in, target, reduction="none")
        (ref.sum() * 0.25).backward()
        work = logits.clone()
        loss = K.softmax_xent_(work, target, 0.25, grad)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        if grad:
            torch.testing.assert_close(work.double(), ref_in.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-7 if dtype == torch.float32 else 1e-4)
        else:
            assert torch.equal(work, logits)                  # untouched without a gradient
        with pytest.raises(ValueError, match="outside"):
            K.softmax_xent_(logits.clone(), torch.tensor([0, 1, 2, 3, 4, vocab]), 1.0, True)
        with pytest.raises(ValueError, match="contiguous"):
            K.softmax_xent_(logits.t(), torch.zeros(vocab, dtype=torch.long), 1.0, True)

    def test_the_chunked_loss_dispatches_to_the_kernel():
        from engine.loss import xent_sum_and_grad_
        logits = torch.randn(5, 300)
        target = torch.randint(0, 300, (5,))
        before = kernels.launch_counts().get("_xent_kernel", 0)
        got = xent_sum_and_grad_(logits.clone(), target, 0.5, True)
        assert kernels.launch_counts()["_xent_kernel"] == before + 1
        torch.testing.assert_close(got, F.cross_entropy(logits, target, reduction="sum"))

    def nf4_paths(qs, dtype=torch.float32):
        """(Triton, C, torch) dequantizations of one quantized weight."""
        from engine.methods import nf4
        triton_w = nf4.dequantize_nf4(qs, dtype)
        old, old_fused = kernels.set_mode("0"), fused._enabled
        try:
            c_w = nf4.dequantize_nf4(qs)
            fused.set_enabled(False)
            torch_w = nf4.dequantize_nf4(qs)
        finally:
            kernels.set_mode(old)
            fused.set_enabled(old_fused)
        return triton_w, c_w, torch_w

    @pytest.mark.parametrize("shape", [(96, 64), (7, 9), (3, 65), (130, 257)])
    @pytest.mark.parametrize("double_quant", [True, False])
    def test_nf4_dequantize_is_bit_identical_to_the_cpu_path(shape, double_quant):
        from engine.methods import nf4
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
        qs = nf4.quantize_nf4(w, nf4.BLOCK, double_quant)
        before = kernels.launch_counts().get("_nf4_kernel", 0)
        triton_w, c_w, torch_w = nf4_paths(qs)
        assert kernels.launch_counts()["_nf4_kernel"] == before + 1
        assert triton_w.shape == c_w.shape == torch_w.shape == w.shape
        assert torch.equal(triton_w, c_w) and torch.equal(triton_w, torch_w)
        assert (triton_w - w).abs().max() > 0                  # it is the quantized weight, not a copy
        # straight to the compute dtype, rounded once. Triton's interpreter truncates fp32 to
        # bf16 where a GPU rounds to nearest (as torch does): there, one bf16 ulp at most
        assert torch.equal(nf4.dequantize_nf4(qs, torch.float16), c_w.to(torch.float16))
        bf16 = nf4.dequantize_nf4(qs, torch.bfloat16)
        assert bf16.dtype == torch.bfloat16
        ulp = torch.finfo(torch.bfloat16).eps * c_w.abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert ((bf16.float() - c_w).abs() <= ulp).all()
        out = torch.empty(qs.numel)
        assert nf4.dequantize_nf4(qs, out=out).data_ptr() == out.data_ptr() and torch.equal(out.view(shape), c_w)

    def test_nf4_dequantize_refuses_inconsistent_storage():
        from engine.methods import nf4
        qs = nf4.quantize_nf4(torch.randn(8, 64), nf4.BLOCK, True)
        code = nf4.nf4_code()
        with pytest.raises(ValueError, match="nf4_dequantize: .* packed bytes"):
            K.nf4_dequantize(qs.packed, code, qs.absmax[:1], qs.absmax_scale, qs.numel, 64, 256)
        with pytest.raises(ValueError, match="uint8 codes with fp32 scales"):
            K.nf4_dequantize(qs.packed, code, qs.absmax.float(), qs.absmax_scale, qs.numel, 64, 256)
        with pytest.raises(ValueError, match="dtype torch.float64"):
            K.nf4_dequantize(qs.packed, code, qs.absmax, qs.absmax_scale, qs.numel, 64, 256, torch.float64)

    ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    STEP_KERNELS = {"_rms_norm_fwd", "_rms_norm_bwd", "_rope_kernel", "_swiglu_fwd", "_swiglu_bwd", "_xent_kernel"}

    @pytest.mark.parametrize("method", ["lora", "qlora"])
    def test_a_training_step_through_the_kernels_equals_the_torch_ops(method):
        """engine.prepare's model (swaps applied), the chunked loss and backward: Triton
        (interpreted) against plain torch ops (C kernels off too): same loss, same LoRA
        gradients, every kernel used, and the same bytes kept for backward as the C kernels."""
        from engine.config import parse_run_config
        from engine.measure import SavedTensorRecorder
        from engine.prepare import prepare_run
        from engine.loss import compute_loss
        cfg = parse_run_config({
            "name": "kernels", "model": "tiny-llama", "task": "causal_lm",
            "dataset": {"name": "demo-instruct", "max_rows": 16},
            "method": {"name": method, "r": 4, "alpha": 8, "target_modules": ALL_LINEARS},
            "training": {"max_steps": 1, "batch_size": 2, "max_seq_len": 16, "eval_every": 0,
                         "eval_generate": 0, "precision": "fp32"}})
        model = prepare_run(cfg).model
        with torch.no_grad():                                  # B = 0 at init would leave A without a gradient
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        ids = torch.randint(5, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

        def step(mode: str, c_kernels: bool):
            old, old_fused = kernels.set_mode(mode), fused._enabled
            fused.set_enabled(c_kernels)
            try:
                model.zero_grad(set_to_none=True)
                before = kernels.launch_counts()
                params = list(model.parameters())
                with SavedTensorRecorder(params) as rec:
                    loss = compute_loss(model, batch, "causal_lm")
                loss.backward()
                after = kernels.launch_counts()
                trained = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            finally:
                kernels.set_mode(old)
                fused.set_enabled(old_fused)
            launched = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
            return loss.detach(), trained, launched, rec.total_bytes

        loss_t, grads_t, launched_t, saved_t = step("interpret", True)
        loss_0, grads_0, launched_0, _ = step("0", False)
        _, _, _, saved_c = step("0", True)
        assert STEP_KERNELS <= launched_t.keys(), launched_t
        assert (method == "qlora") == ("_nf4_kernel" in launched_t)
        assert launched_0 == {}
        assert saved_t == saved_c                             # what the memory estimator counts
        torch.testing.assert_close(loss_t, loss_0, rtol=1e-5, atol=1e-6)
        assert grads_t.keys() == grads_0.keys() and any("lora_A" in n for n in grads_t)
        for name in grads_t:
            torch.testing.assert_close(grads_t[name], grads_0[name], rtol=1e-4, atol=1e-6, msg=name)
        assert all(g.abs().sum() > 0 for g in grads_t.values())   # not trivially equal: every gradient is there
