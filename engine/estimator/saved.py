"""The `model` formula's hidden states, site by site: the bytes autograd saves for
backward in one forward of our training loop (engine.estimator.walk walks a whole
model with these), block by block from a method's Plan (which
tensors require grad, grouped-query attention, gated FFN width, SDPA vs eager
attention, dropout masks, RMSNorm's fp32 upcast, the chunked cross-entropy, and
each method's own tensors)."""

from __future__ import annotations

from dataclasses import dataclass

from ..dims import ModelDims
from ..methods.plan import LayerPlan


@dataclass
class Shape:
    """Sizes of one forward pass."""

    batch: int
    seq: int            # real tokens
    prompt: int         # virtual tokens prepended
    prefix: int         # extra key/value positions (per layer; set per block)
    a: int              # bytes per activation element (training dtype)
    device: str
    attention: str
    resid: int = 0      # bytes per element of the residual stream (0: a); fp32 when trained embeddings feed it
    weight_casts: bool = True   # autocast's 16-bit copies of fp32 trained weights are kept (not under FSDP,
    #                             which gathers each unit's parameters in the compute dtype and frees them)

    @property
    def amp(self) -> bool:
        """A 16-bit run: fp32 master weights, matmuls under autocast (docs/precision.md)."""
        return self.a < 4

    @property
    def r(self) -> int:
        return self.resid or self.a

    @property
    def tokens(self) -> int:
        return self.batch * (self.seq + self.prompt)

    @property
    def q_len(self) -> int:
        return self.seq + self.prompt


class Saved:
    """Adds bytes of saved storages, each named once (autograd keeps one storage
    however many ops save it)."""

    def __init__(self):
        self.parts: dict[str, int] = {}

    def add(self, key: str, nbytes: int) -> None:
        if key not in self.parts:
            self.parts[key] = int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def dropout_mask_bytes(shape: Shape) -> int:
    """Bytes per element of a dropout mask: CUDA keeps a bool mask, CPU's
    dropout multiplies by a noise tensor of the activation dtype."""
    return 1 if shape.device == "cuda" else shape.a


def linear_site(lp: LayerPlan, path: str, saved: Saved, x_key: str, x_numel: int, out_numel_per_tok: int,
                shape: Shape, rg_in: bool, x_bytes: int = 0) -> bool:
    """One linear layer reading x (`x_bytes` per element; 0: the activation dtype):
    what it saves (its input when its weight trains; LoRA's input, dropout and rank-r
    output; DoRA's scaled output) and whether its output requires grad.

    Under autocast (a 16-bit run) a matmul computes in 16 bits from 16-bit copies of
    its fp32 operands, and those copies are what it saves: an fp32 input is copied per
    layer (never shared); a trainable fp32 weight is copied when the input's gradient
    needs it; LoRA's layers upcast their input to the fp32 of their matrices, so each
    keeps its own 16-bit copy of it, and of A (when the input needs a gradient) and B."""
    a, T = shape.a, shape.tokens
    x_bytes = x_bytes or a
    n_in = x_numel // max(T, 1)
    cast_in = shape.amp and x_bytes == 4
    in_key = f"{path}.in_cast" if cast_in else x_key
    trains = path in lp.full
    if trains:
        saved.add(in_key, x_numel * (a if shape.amp else x_bytes))
        if shape.amp and rg_in and shape.weight_casts:
            saved.add(f"{path}.weight_cast", n_in * out_numel_per_tok * a)
    if path in lp.weight_saved:
        # an adapter that builds a weight-sized tensor from its parameters (LoHa/LoKr's ΔW, OFT's
        # rotation blocks) keeps it and the layer input for backward
        saved.add(in_key, x_numel * (a if shape.amp else x_bytes))
        saved.add(f"{path}.weight_saved", lp.weight_saved[path] * a)
        return True
    if path in lp.lora:
        r, p = lp.lora[path]
        if shape.amp:
            if p > 0:      # dropout on the fp32 copy: its mask (CPU: fp32 noise; CUDA: bool)
                saved.add(f"{path}.lora_dropout_mask", x_numel * (1 if shape.device == "cuda" else 4))
            saved.add(f"{path}.lora_in_cast", x_numel * a)
            if rg_in:
                saved.add(f"{path}.lora_A_cast", n_in * r * a)
            saved.add(f"{path}.lora_B_cast", r * out_numel_per_tok * a)
            if lp.dora and rg_in:
                # DoRA's combined weight W + s·BA, copied to 16 bits for the input's gradient
                saved.add(f"{path}.dora_weight_cast", n_in * out_numel_per_tok * a)
        elif p > 0:
            saved.add(f"{path}.lora_dropout_mask", x_numel * dropout_mask_bytes(shape))
            saved.add(f"{path}.lora_dropout_out", x_numel * a)
        else:
            saved.add(x_key, x_numel * a)
        saved.add(f"{path}.lora_A_out", T * r * a)
        if lp.dora:
            saved.add(f"{path}.dora_sum", T * out_numel_per_tok * a)
        return True
    return rg_in or trains


def norm_site(saved: Saved, key: str, shape: Shape, dims: ModelDims, rg: bool, trains: bool, n_tok: int) -> bool:
    """RMSNorm (Llama: upcast to fp32, x·rsqrt, weight·x) or LayerNorm (input,
    mean, rstd). Returns whether the output requires grad. The input is the residual
    stream (`shape.r` bytes per element)."""
    h, a = dims.hidden_size, shape.a
    if not (rg or trains):
        return False
    if dims.norm == "rmsnorm":
        if fused_rms_norm(shape, trains):
            # the fused kernels (fp32 CPU C, CUDA Triton) keep the input and an fp32 rstd per row
            if rg or trains:
                saved.add(key + ".in", n_tok * h * shape.r)
                saved.add(key + ".rsqrt", n_tok * 4)
            return True
        if rg:
            saved.add(key + ".in_fp32", n_tok * h * 4)        # x.float() (same storage as x in fp32)
            saved.add(key + ".rsqrt", n_tok * 4)
        if trains:
            saved.add(key + ".normed", n_tok * h * shape.r)    # the normalized x, back in the input's dtype
    else:
        saved.add(key + ".in", n_tok * h * shape.r)
        saved.add(key + ".stats", n_tok * 8)                  # mean and rstd, fp32
    return True


def fused_rms_norm(shape: Shape, trains: bool) -> bool:
    """Which RMSNorm runs: on CUDA the Triton kernel (engine/kernels); on CPU the C
    kernel for fp32 with a frozen weight (engine.swaps); otherwise transformers' ops."""
    return shape.device == "cuda"


def norm_out_bytes(shape: Shape, trains: bool) -> int:
    """Bytes per element of a norm's output: weight · x in the input's dtype, promoted
    to fp32 when the weight is an fp32 trainable (or the input fp32)."""
    return 4 if (trains or shape.r == 4) else shape.a


def uses_math_kernel(shape: Shape, dropout_p: float) -> bool:
    """CPU SDPA falls back to the math kernel (which keeps the seq² probabilities)
    when attention dropout is on; CUDA's memory-efficient kernel does dropout itself."""
    return shape.device == "cpu" and dropout_p > 0 and shape.attention != "eager"


def attention_output_key(shape: Shape, dropout_p: float) -> str:
    """SDPA's fused kernels return the output already laid out (batch, seq, heads,
    dim): o_proj reads the same storage SDPA saved. Eager / math attention make a
    contiguous copy."""
    return "attn_ctx" if shape.attention == "eager" or uses_math_kernel(shape, dropout_p) else "attn.out"


def attention_site(lp: LayerPlan, saved: Saved, dims: ModelDims, shape: Shape, rg_q: bool, rg_k: bool,
                   rg_v: bool, dropout_p: float, causal_rope: bool, v_storage: int = 0,
                   qk_views: bool = False) -> None:
    """What attention saves, given which of q, k, v require grad. `v_storage`: elements
    per token of the tensor v is a view of (a fused q/k/v projection's output, which
    SDPA keeps whole: it takes the strided view as it is); 0: v is its own tensor.
    `qk_views`: q and k are views of that same output too (GPT-2: no RoPE or norm copies
    them), so SDPA's fused kernels keep no storage of their own for them."""
    if not (rg_q or rg_k or rg_v):
        return
    a, B = shape.a, shape.batch
    S = shape.q_len
    Skv = S + lp.prefix + lp.adaption_prompt
    hq = dims.num_heads * dims.head_dim
    kv = dims.kv_dim
    heads = dims.num_heads
    T = B * S
    eager = shape.attention == "eager"
    math_path = uses_math_kernel(shape, dropout_p)
    if eager or math_path:
        n_rep = heads // dims.num_kv_heads
        # CPU SDPA's math kernel computes a 16-bit attention in fp32: its q, k, v copies,
        # probabilities and dropout mask are fp32
        a = 4 if math_path and shape.amp else a
        saved.add("attn.q", T * hq * a)
        # eager attention repeats grouped k/v to every head (a copy when n_rep > 1)
        saved.add("attn.k", B * Skv * (hq if n_rep > 1 else kv) * a)
        saved.add("attn.v", B * Skv * (hq if n_rep > 1 else kv) * a)     # matmul copies a strided v
        probs = B * heads * S * Skv
        fp32_softmax = dims.arch.softmax_fp32 or (dims.arch.softmax_mask_dtype and shape.r == 4)
        if fp32_softmax and eager:
            saved.add("attn.probs_fp32", probs * 4)           # softmax in fp32, cast back for p @ v
            if a != 4 and dropout_p == 0:                      # (with dropout p @ v keeps the dropped copy)
                saved.add("attn.probs_cast", probs * a)
        else:
            saved.add("attn.probs", probs * a)
        if dropout_p > 0:
            saved.add("attn.dropout_mask", probs * (4 if math_path and shape.amp else dropout_mask_bytes(shape)))
            saved.add("attn.probs_dropped", probs * a)
        return
    # SDPA flash / memory-efficient: q, k, v, output and the fp32 log-sum-exp; no seq² tensor.
    # With an explicit mask (prefix slots) transformers repeats grouped k/v to every head and
    # the kernel keeps the float mask.
    masked = lp.prefix > 0
    kv_w = hq if masked else kv
    shared = qk_views and v_storage and not masked
    if not shared:
        saved.add("attn.q", T * hq * a)
        saved.add("attn.k", B * Skv * kv_w * a)
    saved.add("attn.v", B * Skv * (kv_w if masked else (v_storage or kv)) * a)
    if masked:
        saved.add("attn.mask", B * S * Skv * a)
    saved.add("attn.out", T * hq * a)
    saved.add("attn.lse", B * heads * S * 4)


def adapter_site(lp: LayerPlan, site: str, saved: Saved, shape: Shape, dims: ModelDims, x_key: str) -> bool:
    """Bottleneck adapters at `site`: input (shared with the sublayer's when
    parallel), down-projection output, activation output."""
    any_ = False
    T, a, h = shape.tokens, shape.a, dims.hidden_size
    for kind, s, width in lp.adapters:
        if s != site:
            continue
        any_ = True
        saved.add(f"{site}.adapter.in" if kind == "serial" else x_key, T * h * a)
        saved.add(f"{site}.adapter.down", T * width * a)
        saved.add(f"{site}.adapter.act", T * width * a)
    if any_ and site in lp.adapter_saved:   # e.g. a layer norm's input, generated weights
        per_token, fixed = lp.adapter_saved[site]
        saved.add(f"{site}.adapter.extra", (T * per_token + fixed) * a)
    return any_


# tensors of the FFN width an ungated FFN's activation keeps for backward (default 1: its input).
# gelu_new (transformers' NewGELUActivation) is composed of elementwise ops:
# 0.5·x·(1 + tanh(c·(x + 0.044715·x³))) keeps x (for pow and the outer products), tanh's output,
# 0.5·x and 1 + tanh
ACTIVATION_SAVED = {"gelu_new": 4}


def kv_adapters_site(lp: LayerPlan, saved: Saved, kv_bytes: int, rg_k: bool, rg_v: bool) -> tuple[bool, bool]:
    """IA3's scaling of the keys / values keeps its input (`kv_bytes`, one projection's
    output), and IA3 or a prefix makes the keys and values need a gradient. Returns the
    new (rg_k, rg_v)."""
    if "k" in lp.ia3:
        saved.add("ia3.k", kv_bytes)
        rg_k = True
    if "v" in lp.ia3:
        saved.add("ia3.v", kv_bytes)
        rg_v = True
    if lp.prefix:
        rg_k = rg_v = True
    return rg_k, rg_v


def llama_block(lp: LayerPlan, dims: ModelDims, shape: Shape, rg: bool, dropout_p: float,
                no_attn_norm: bool = False, out_p: float = 0.0, ffn_p: float = 0.0,
                ffn_out_p: float = 0.0) -> tuple[int, bool, dict]:
    """Saved bytes of one pre-norm block (Llama and the families shaped like it: fused
    q/k/v, q/k norms, extra sublayer norms, gated MLPs, experts; ModernBERT's encoder)
    given whether its input requires grad. `no_attn_norm`: the attention reads the block
    input itself (ModernBERT's first block); `out_p`, `ffn_p`: dropout on the attention
    output and on the FFN's activation (ModernBERT's out_drop and mlp drop); `ffn_out_p`: dropout on
    the FFN's output (GPT-2's resid_pdrop). A non-gated FFN (GPT-2) keeps what its activation saves
    (ACTIVATION_SAVED)."""
    s = Saved()
    T, a, h, i = shape.tokens, shape.a, dims.hidden_size, dims.intermediate_size
    hq, kv = dims.num_heads * dims.head_dim, dims.kv_dim
    arch = dims.arch
    if no_attn_norm:
        rg_n1, nb = rg or lp.bias, shape.r
    else:
        rg_n1 = norm_site(s, "ln1", shape, dims, rg, lp.norms, T) or lp.bias
        nb = norm_out_bytes(shape, lp.norms)
    if arch.fused_qkv:
        rg_q = rg_k = rg_v = linear_site(lp, arch.q, s, "n1", T * h, hq + 2 * kv, shape, rg_n1, nb)
    else:
        rg_q = linear_site(lp, arch.q, s, "n1", T * h, hq, shape, rg_n1, nb)
        rg_k = linear_site(lp, arch.k, s, "n1", T * h, kv, shape, rg_n1, nb)
        rg_v = linear_site(lp, arch.v, s, "n1", T * h, kv, shape, rg_n1, nb)
    if arch.qk_norm != "none":     # RMSNorm of q and k keeps their projections' outputs (fp32) and rsqrt
        if rg_q or lp.norms:
            s.add("qn.in", T * hq * 4)
            s.add("qn.rsqrt", T * (dims.num_heads if arch.qk_norm == "head" else 1) * 4)
        if rg_k or lp.norms:
            s.add("kn.in", T * kv * 4)
            s.add("kn.rsqrt", T * (dims.num_kv_heads if arch.qk_norm == "head" else 1) * 4)
        rg_q, rg_k = rg_q or lp.norms, rg_k or lp.norms
    rg_k, rg_v = kv_adapters_site(lp, s, T * kv * a, rg_k, rg_v)
    # a fused projection's value is a view of its output; q and k are copied by RoPE / their norms
    # (or IA3's scaling of k), else they are views of it too (GPT-2)
    attention_site(lp, s, dims, shape, rg_q, rg_k, rg_v, dropout_p, True,
                   v_storage=hq + 2 * kv if arch.fused_qkv and "v" not in lp.ia3 else 0,
                   qk_views=arch.positions != "rope" and arch.qk_norm == "none" and "k" not in lp.ia3)
    rg_attn = rg_q or rg_k or rg_v
    if lp.adaption_prompt:       # LLaMA-Adapter's gated prompt attention: its own q, fp32 softmax, gated probs
        probs = shape.batch * dims.num_heads * shape.q_len * lp.adaption_prompt
        s.add("adaption.q", T * hq * a)
        s.add("adaption.probs_fp32", probs * 4)
        s.add("adaption.probs_gated", probs * a)
        s.add("adaption.out", T * hq * a)
        rg_attn = True
    rg_o = linear_site(lp, arch.o, s, attention_output_key(shape, dropout_p), T * hq, h, shape, rg_attn)
    if rg_o and out_p > 0:
        s.add("attn.out_dropout_mask", T * h * dropout_mask_bytes(shape))
    rg_o = adapter_site(lp, "attn", s, shape, dims, "attn_o") or rg_o
    for extra in arch.extra_norms[:1]:      # Gemma: a norm on the attention output
        rg_o = norm_site(s, "post_attn_norm", shape, dims, rg_o, lp.norms, T) or rg_o
    rg2 = rg or rg_o
    rg_n2 = norm_site(s, "ln2", shape, dims, rg2, lp.norms, T) or lp.bias
    par = adapter_site(lp, "ffn", s, shape, dims, "n2") if any(k == "parallel" for k, *_ in lp.adapters) else False
    if arch.experts:
        return _moe_ffn(lp, dims, shape, s, rg_n2, rg2, par)
    if arch.fused_gate_up:
        rg_g = rg_u = linear_site(lp, arch.ffn_in[0], s, "n2", T * h, 2 * i, shape, rg_n2, nb)
        if rg_g:                 # chunk views of the gate_up output (the activation's input, up) and act(gate)
            s.add("mlp.gate_up", T * 2 * i * a)
            s.add("mlp.act", T * i * a)
    elif not arch.gated_ffn:
        rg_g = rg_u = linear_site(lp, arch.ffn_in[0], s, "n2", T * h, i, shape, rg_n2, nb)
        if rg_g:
            for n in range(ACTIVATION_SAVED.get(arch.activation, 1)):
                s.add(f"mlp.act_saved{n}", T * i * a)
    else:
        rg_g = linear_site(lp, arch.ffn_in[0], s, "n2", T * h, i, shape, rg_n2, nb)
        rg_u = linear_site(lp, arch.ffn_in[1], s, "n2", T * h, i, shape, rg_n2, nb)
        # the engine's fused SwiGLU (engine.swaps.SwiGLUMLP) keeps silu's input, not its output:
        # gate(x) for either gradient, up(x) for gate's; another activation keeps its output too
        if rg_g or rg_u:
            s.add("mlp.gate", T * i * a)
        if rg_g:
            s.add("mlp.up", T * i * a)
        if (rg_g or rg_u) and arch.activation != "silu":
            s.add("mlp.act", T * i * a)
            s.add("mlp.up", T * i * a)
    rg_prod = rg_g or rg_u
    if "ff" in lp.ia3:
        s.add("ia3.ff", T * i * a)
        rg_prod = True
    if rg_prod and ffn_p > 0:
        s.add("mlp.dropout_mask", T * i * dropout_mask_bytes(shape))
    rg_d = linear_site(lp, arch.ffn_out, s, "mlp.prod", T * i, h, shape, rg_prod)
    if rg_d and ffn_out_p > 0:
        s.add("mlp.out_dropout_mask", T * h * dropout_mask_bytes(shape))
    for extra in arch.extra_norms[1:]:      # Gemma: a norm on the FFN output
        rg_d = norm_site(s, "post_ffn_norm", shape, dims, rg_d, lp.norms, T) or rg_d
    if any(k == "serial" for k, *_ in lp.adapters):
        rg_d = adapter_site(lp, "ffn", s, shape, dims, "ffn_out") or rg_d
    return s.total, rg2 or rg_d or par, s.parts


def _moe_ffn(lp: LayerPlan, dims: ModelDims, shape: Shape, s: Saved, rg_in: bool, rg2: bool,
             par: bool) -> tuple[int, bool, dict]:
    """A mixture-of-experts FFN (transformers 5.x: a router, then per expert the tokens
    routed to it through its slice of the 3-D gate_up / down tensors): the router's fp32
    probabilities and top-k, and per routed token (tokens x active experts) the gate_up
    output, act(gate), the down output and the routing indices and weight. An expert
    tensor whose weight needs a gradient (full, or LoRA on it via target_parameters)
    also keeps its per-token input; LoRA's wrapper (engine.methods.expert_lora) builds
    W + ΔW for the whole E x out x in stack, which F.linear keeps (measured)."""
    T, a, h, ie = shape.tokens, shape.a, dims.hidden_size, dims.expert_intermediate_size
    ex = dims.arch.experts
    k, E = dims.experts_per_token, dims.num_experts
    trains = ex.path in lp.full
    if not (rg_in or trains or lp.expert_lora):
        return s.total, rg2 or par, s.parts
    if ex.router in lp.full:
        s.add("n2", T * h * a)
    s.add("moe.router_probs", T * E * 4)
    s.add("moe.topk", T * k * (8 + 4) + T * 4)
    routed = T * k
    if trains:   # both expert tensors train: F.linear keeps each one's per-token input
        s.add("moe.expert_in", routed * h * a)
        s.add("moe.prod", routed * ie * a)
    for (path, out_f, in_f), (_, in_size) in zip(dims.expert_tensors(), ex.param_sizes):
        takes_block_input = in_size == "hidden"
        if path not in lp.expert_lora or (takes_block_input and not rg_in):
            continue      # the first projection's input needs no gradient: F.linear keeps neither
        s.add(f"{path}.adapted", E * out_f * in_f * a)
        s.add("moe.expert_in" if takes_block_input else "moe.prod", routed * in_f * a)
    s.add("moe.gate_up", routed * 2 * ie * a)
    s.add("moe.act", routed * ie * a)
    s.add("moe.down", routed * h * 4)           # times the fp32 routing weight
    s.add("moe.index", routed * (8 + 8 + 4))
    return s.total, True, s.parts
