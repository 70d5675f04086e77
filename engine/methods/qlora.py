"""QLoRA: LoRA on top of a base model whose linear weights are stored in 4-bit NF4.

Dettmers, Pagnoni, Holtzman, Zettlemoyer, "QLoRA: Efficient Finetuning of
Quantized LLMs", NeurIPS 2023, arXiv:2305.14314.

Every linear layer inside the transformer blocks is quantized with our own NF4
code (engine.methods.nf4: blocks of 64, optional double quantization of the
absmax constants, two codes per byte) and dequantized on the fly in forward and
backward (the dequantized weight is never kept for backward), in fp32 or bf16.
Embeddings, norms and heads stay in full precision. LoRA layers (engine.methods.lora)
sit on the target modules as usual. The peft export is a plain LoRA adapter
(peft type LORA) for the same base; it reproduces our outputs exactly on the
dequantized base (`dequantized_base`) and approximately on the fp32 one.
"""

from __future__ import annotations

import copy
import threading
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..arch import arch_of, set_submodule
from ..gemm import matmul, matmul_t
from .base import ApplyContext, MethodSpec, PeftExport, QuantizedLayer, freeze_all, merge_and_unload
from .lora import LoraConfig, LoraLinear, apply_expert_lora, count_lora_trainable, default_targets, dense_weight, \
    export_lora_peft, inject_lora, plan_lora, ranks_and_alphas
from .nf4 import BLOCK, QuantState, dequantize_nf4, quantize_nf4, summarize_errors
from .targeting import is_conv1d, linear_like, resolve_targets

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class QLoraConfig(LoraConfig):
    name: Literal["qlora"] = "qlora"
    double_quant: bool = Field(True, description="quantize the absmax constants to 8 bits (blocks of 256)")
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the NF4 weight is dequantized to for its matmuls: auto = the run's dtype "
                            "(training.precision: bf16 on CUDA by default, fp32 on CPU); fp32 / bf16 / fp16 explicit")


def compute_dtype_of(cfg: QLoraConfig, run_dtype) -> torch.dtype:
    """`compute_dtype` resolved: `auto` is the run dtype (fp32 when none is given)."""
    if cfg.compute_dtype == "auto":
        return run_dtype or torch.float32
    return COMPUTE_DTYPES[cfg.compute_dtype]


_scratch = threading.local()


def _scratch_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """This thread's fp32 buffer of `numel` elements on `device` (one per size)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (numel, str(device))
    if key not in buffers:
        buffers[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return buffers[key]


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward: only the packed
    weight stays in memory between the two. The dequantized weight is used and
    dropped inside each call, so it goes into a per-thread scratch buffer that every
    layer of that shape shares (a fresh 3.5 MB tensor twice per layer per step left
    the heap fragmented: +0.1 GB peak RSS on SmolLM2)."""

    @staticmethod
    def forward(ctx, x, layer):
        # compute in the layer's compute dtype, answer in the input's (as bitsandbytes'
        # Linear4bit does): a bf16 projection next to fp32 ones would break attention
        ctx.layer, ctx.x_dtype = layer, x.dtype
        w = layer.dequantize(scratch=True)
        # x is 2-D and the result a fresh tensor (no view made here), so LoRA may add
        # its update to it in place
        return matmul_t(x.to(w.dtype), w).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantize(scratch=True)
        return matmul(grad.to(w.dtype), w).to(ctx.x_dtype), None


class NF4Linear(QuantizedLayer):
    """A frozen linear layer whose weight is stored as NF4."""

    output_unsaved = True        # _NF4Matmul and the bias add keep nothing of the output

    def __init__(self, base: nn.Module, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 block_size: int = BLOCK):
        super().__init__()
        w = dense_weight(base).detach()
        self.was_conv1d = is_conv1d(base)
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.compute_dtype = compute_dtype
        qs = quantize_nf4(w, block_size, double_quant)
        # the tensors themselves live on as the parameter and buffers below; the state
        # keeps empty placeholders (a [:0] view would pin the storage of the originals)
        self.qstate = QuantState(qs.shape, qs.numel, qs.packed.new_empty(0), qs.absmax.new_empty(0), None,
                                 qs.block_size, qs.dq_block_size)
        self.weight = nn.Parameter(qs.packed, requires_grad=False)
        self.weight.quant_numel = qs.numel          # counted as the parameters it stands for
        self.register_buffer("absmax", qs.absmax)
        self.register_buffer("absmax_scale", qs.absmax_scale)
        b = getattr(base, "bias", None)
        self.bias = nn.Parameter(b.detach().clone(), requires_grad=False) if b is not None else None

    def dequantize(self, scratch: bool = False) -> torch.Tensor:
        """The (out x in) weight in the compute dtype. `scratch`: into this thread's
        shared buffer for the shape, valid until the next scratch dequantization."""
        out = _scratch_buffer(self.qstate.numel, self.weight.device) if scratch else None
        return dequantize_nf4(self.qstate, self.compute_dtype, packed=self.weight, absmax=self.absmax,
                              absmax_scale=self.absmax_scale, out=out)

    def storage_bits(self) -> int:
        n = self.weight.numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.absmax_scale is not None:
            n += self.absmax_scale.numel() * 32
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x.reshape(-1, x.shape[-1]), self).view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def to_float_layer(self) -> nn.Module:
        """A full-precision layer (nn.Linear, or Conv1D if it was one) with the dequantized weight."""
        w = self.dequantize().float()
        if self.was_conv1d:
            from transformers.pytorch_utils import Conv1D
            layer = Conv1D(self.out_features, self.in_features)
            layer.weight.data = w.T.contiguous()
            if self.bias is not None:
                layer.bias.data = self.bias.detach().float().clone()
            return layer.to(w.device)
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device)
        with torch.no_grad():
            layer.weight.copy_(w)
            if self.bias is not None:
                layer.bias.copy_(self.bias.float())
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, " \
               f"double_quant={self.absmax_scale is not None}"


class QLoraLinear(LoraLinear):
    """LoRA over an NF4Linear; merging dequantizes the base first."""

    def __init__(self, base, r, alpha, dropout=0.0, **kw):
        super().__init__(base, r, alpha, dropout, **kw)
        self.fan_in_fan_out = getattr(base, "was_conv1d", False)

    @torch.no_grad()
    def merge(self) -> None:
        if isinstance(self.base_layer, NF4Linear):
            self.base_layer = self.base_layer.to_float_layer()
        super().merge()


def quantizable_names(model: nn.Module) -> list[str]:
    prefix = arch_of(model).blocks_path + "."
    return [n for n, m in model.named_modules() if n.startswith(prefix) and linear_like(m)]


def quantize_model(model: nn.Module, double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                   names=None) -> dict[str, dict]:
    """Replace the block linear layers by NF4Linear; returns the quantization error
    of each against the weight it was made from (fp32, or the run dtype when the
    layer was quantized while loading). Layers quantized while loading are kept."""
    report = {n: m.load_error for n, m in model.named_modules() if isinstance(m, NF4Linear)
              and getattr(m, "load_error", None) is not None}
    for name in names if names is not None else quantizable_names(model):
        base = model.get_submodule(name)
        q = NF4Linear(base, double_quant, compute_dtype)
        report[name] = layer_error(dense_weight(base).detach().float(), q)
        set_submodule(model, name, q)
    return report


class QuantizeOnLoad:
    """engine.loading.ModuleTransform: each block linear becomes an NF4Linear as soon as
    its weight has streamed in, so the 16-bit (or fp32) copy of at most one layer
    exists at a time (QLoRA of a model larger than host memory)."""

    def __init__(self, cfg: QLoraConfig, run_dtype):
        self.double_quant, self.compute_dtype = cfg.double_quant, compute_dtype_of(cfg, run_dtype)

    def select(self, model: nn.Module) -> set[str]:
        return set(quantizable_names(model))

    def __call__(self, name: str, module: nn.Module) -> nn.Module:
        q = NF4Linear(module, self.double_quant, self.compute_dtype)
        q.load_error = layer_error(dense_weight(module).detach().float(), q)
        return q


@torch.no_grad()
def own_unquantized_tensors(model: nn.Module) -> None:
    """Copy the tensors that stay full precision (embeddings, norms, heads) into the
    process's own memory. transformers maps safetensors files and hands out tensors
    that live in that mapping; while any of them (the embedding, say) is alive, the
    whole mapping stays, and the pages of the fp32 weights just quantized away keep
    counting as resident memory: 0.4 GB on SmolLM2-135M, more than the 4-bit saving
    would be worth. Tied parameters stay tied (each Parameter is visited once). The
    NF4 tensors were made in process memory and are left as they are, and so is any
    tensor in a resizable storage (made by this process, e.g. streamed in by
    engine.loading: a file mapping's storage is not resizable)."""
    made_here = {id(t) for m in model.modules() if isinstance(m, NF4Linear)
                 for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))}
    for t in list(model.parameters()) + list(model.buffers()):
        if (id(t) in made_here or not isinstance(t.data, torch.Tensor) or t.device.type != "cpu"
                or t.numel() == 0 or t.untyped_storage().resizable()):
            continue
        t.data = t.data.clone()


def layer_error(w: torch.Tensor, q: NF4Linear) -> dict:
    err = q.dequantize().float() - w
    return {"numel": w.numel(), "max_abs_error": err.abs().max().item(), "mean_abs_error": err.abs().mean().item(),
            "rmse": err.pow(2).mean().sqrt().item(),
            "relative_fro_error": (err.norm() / w.norm().clamp_min(1e-30)).item(),
            "bits_per_param": q.storage_bits() / w.numel()}


def apply_qlora(model: nn.Module, cfg: QLoraConfig, ctx: ApplyContext) -> None:
    if cfg.init == "pissa":
        raise ValueError("method.init: 'pissa' is not available with qlora (the base weight is quantized)")
    freeze_all(model)
    # layers quantized while loading (QuantizeOnLoad) are NF4Linear already: still targets
    names = resolve_targets(model, cfg.target_modules or default_targets(model),
                            want=lambda m: linear_like(m) or isinstance(m, NF4Linear))
    report = quantize_model(model, cfg.double_quant, compute_dtype_of(cfg, ctx.dtype))
    own_unquantized_tensors(model)
    ranks, alphas = ranks_and_alphas(cfg, names)
    torch.manual_seed(ctx.seed)
    inject_lora(model, names, cfg.r, cfg.alpha, cfg.dropout, use_rslora=cfg.use_rslora, init=cfg.init,
                ranks=ranks, alphas=alphas, layer_cls=QLoraLinear)
    apply_expert_lora(model, cfg)     # the expert tensors are not linears: they stay unquantized
    object.__setattr__(model, "_quantization_report", {"modules": report, "total": summarize_errors(report)})


def quantization_report(model: nn.Module) -> dict:
    """The error of the NF4 weights against fp32, measured when qlora was applied:
    {"modules": {name: {...}}, "total": {...}} (see nf4.quantization_error)."""
    rep = getattr(model, "_quantization_report", None)
    if rep is None:
        raise ValueError("the model has no NF4-quantized layers (apply qlora first)")
    return rep


def dequantized_base(model: nn.Module) -> nn.Module:
    """A copy of the base model as the qlora layers see it: NF4 weights dequantized
    to fp32, LoRA layers removed (not merged). peft's LoRA export loads onto this
    with identical outputs."""
    m = copy.deepcopy(model)
    for name, layer in [(n, x) for n, x in m.named_modules() if isinstance(x, LoraLinear)]:
        set_submodule(m, name, layer.base_layer)
    for name, layer in [(n, x) for n, x in m.named_modules() if isinstance(x, NF4Linear)]:
        set_submodule(m, name, layer.to_float_layer())
    return m


def export_qlora_peft(model: nn.Module, cfg: QLoraConfig, ctx: ApplyContext) -> PeftExport:
    return export_lora_peft(model, cfg, ctx)


count_qlora_trainable = count_lora_trainable


SPEC = MethodSpec(
    name="qlora", config_cls=QLoraConfig, apply=apply_qlora,
    paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314)",
    summary="LoRA over a base whose linear weights are stored as 4-bit NF4 (double-quantized constants).",
    trains="low-rank matrices A and B; the NF4 base stays frozen",
    mergeable=True, merge=merge_and_unload, peft_export=export_qlora_peft, count_trainable=count_qlora_trainable,
    family="lora", quantizes_base=True, plan=plan_lora, load_transform=QuantizeOnLoad,
    default_lr=0.005,   # bench/RESULTS-default-lr.md
)
