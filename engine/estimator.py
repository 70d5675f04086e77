"""Memory estimator: bytes of GPU memory one training step needs, from a model
config alone (no weights loaded, no model instantiated).

Rows: cuda_context, weights, gradients, hidden_states (activations saved for
backward), optimizer, total. Three formulas side by side:

- ``slide``: the lecture slide's rule of thumb (weights size·N, gradients and
  two optimizer states for the trainable part, ≈1 GiB CUDA context, hidden
  states size·L·(20·H·seq + 3·seq²)·bs with H the number of attention heads).
- ``appendix``: the slide's rows with the appendix's hidden-state formula
  size·(3·h·seq·bs + 18·L·h·seq·bs + 3·L·heads·seq²·bs + vocab·seq·bs).
- ``model`` (default): architecture- and method-aware. It walks one forward pass
  of our training loop symbolically, tensor by tensor, and adds up what autograd
  saves for backward: it follows which tensors require grad (nothing before the
  first trainable module is saved), grouped-query attention, gated FFN width,
  SDPA (no seq² scores kept) vs eager attention, dropout masks, RMSNorm's fp32
  upcast, our chunked cross-entropy (one fp32 chunk of logits), and each
  method's own tensors (LoRA's inputs and rank-r outputs, DoRA's scaled output,
  IA³'s scaled tensors, adapter bottlenecks, prompt/prefix tokens). Weights are
  exact parameter counts, NF4 weights include their block constants.

See docs/estimator.md for the formulas, the slide reproduction and the
measured accuracy (bench/estimator_accuracy.py).
"""

from __future__ import annotations

import dataclasses

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .dims import ModelDims, dims_from_config
from .methods.plan import LayerPlan, Plan

GiB = 1 << 30
CATALOG_DIR = Path(__file__).parent / "catalog"
ROWS = ("cuda_context", "weights", "gradients", "hidden_states", "optimizer", "total")
FORMULAS = ("slide", "appendix", "model")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
QUANTS = ("none", "nf4", "nf4-dq")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
TASKS = ("classification", "causal_lm")
ATTENTIONS = ("sdpa", "eager", "flash")
DEVICES = ("cuda", "cpu")

CUDA_CONTEXT_BYTES = 1 * GiB          # the slide's "≈ 1 GB"; kernels + cuBLAS workspace on a recent GPU
NF4_BLOCK = 64                        # weights per fp32 (or 8-bit) absmax constant
NF4_DQ_BLOCK = 256                    # 8-bit absmax constants per fp32 scale (double quantization)
NF4_BITS = 4 + 32 / NF4_BLOCK                                   # 4.5 bits / weight
NF4_DQ_BITS = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_DQ_BLOCK)  # 4.127 bits / weight
ADAM8_BLOCK = 2048                    # block-wise 8-bit optimizer states (Dettmers et al. 2022)
from .loss import LOSS_CHUNK  # noqa: E402

GPU_PRESETS = (
    ("16 GB (V100 16GB, T4, A4000)", 16 * GiB),
    ("24 GB (RTX 3090/4090, A10, L4)", 24 * GiB),
    ("40 GB (A100 40GB)", 40 * GiB),
    ("48 GB (A6000, L40S)", 48 * GiB),
    ("80 GB (A100 80GB, H100)", 80 * GiB),
)


# ---------------------------------------------------------------------------------------------
# Model configs: bundled, catalog, file, dict
# ---------------------------------------------------------------------------------------------

def catalog_names() -> list[str]:
    """Names of the model configs shipped in engine/catalog/."""
    return sorted(p.stem for p in CATALOG_DIR.glob("*.json"))


def load_model_config(name_or_path: Union[str, dict, Path]) -> dict:
    """A config.json dict for a catalog name, a tiny test model, a path to a
    config.json (or a directory holding one), or a dict (returned as is)."""
    if isinstance(name_or_path, dict):
        return dict(name_or_path)
    name = str(name_or_path)
    if (CATALOG_DIR / f"{name}.json").is_file() and "/" not in name:
        return json.loads((CATALOG_DIR / f"{name}.json").read_text())
    from .models import TINY_MODELS
    if name in TINY_MODELS:
        from .models import tiny_config_dict
        return tiny_config_dict(name)
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        try:
            cfg = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"model: {name!r} is not a readable config.json: {e}") from None
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise ValueError(f"model: {name!r} has no model_type; is it a Hugging Face config.json?")
        return cfg
    raise ValueError(f"model: unknown model {name!r}; give a catalog name ({', '.join(catalog_names())}), "
                     f"a tiny test model ({', '.join(TINY_MODELS)}), a path to a config.json, or a config dict")


def model_dims(cfg: dict) -> ModelDims:
    try:
        return dims_from_config(cfg)
    except (KeyError, TypeError) as e:
        raise ValueError(f"model: config lacks a field the estimator needs: {e}") from None


def default_task(dims: ModelDims) -> str:
    """BERT-family encoders default to classification, decoders to causal LM."""
    return "classification" if dims.family == "bert" else "causal_lm"


# ---------------------------------------------------------------------------------------------
# Exact parameter counts
# ---------------------------------------------------------------------------------------------

def linear_params(in_f: int, out_f: int, bias: bool) -> int:
    return in_f * out_f + (out_f if bias else 0)


def norm_params(dims: ModelDims) -> int:
    return dims.hidden_size * (2 if dims.norm == "layernorm" else 1)


def block_params(dims: ModelDims) -> int:
    """Parameters of one transformer block (linears and its two norms)."""
    lin = sum(linear_params(s.in_features, s.out_features, s.bias) for s in dims.block_linears())
    return lin + 2 * norm_params(dims)


def is_roberta(cfg: dict) -> bool:
    return cfg.get("model_type") == "roberta"


def is_deberta(cfg: dict) -> bool:
    return cfg.get("model_type") in ("deberta-v2", "deberta")


def embedding_params(cfg: dict, dims: ModelDims) -> int:
    h = dims.hidden_size
    n = dims.vocab_size * h
    if dims.family == "gpt2":
        return n + dims.max_position_embeddings * h
    if dims.family == "bert":
        if not is_deberta(cfg) or cfg.get("position_biased_input", True):
            n += dims.max_position_embeddings * h
        n += dims.type_vocab_size * h
        n += 2 * h                                            # embeddings.LayerNorm
        emb = cfg.get("embedding_size", h)
        if is_deberta(cfg) and emb != h:
            n += emb * h - dims.vocab_size * h + dims.vocab_size * emb   # smaller embeddings + projection
    return n


def encoder_extra_params(cfg: dict, dims: ModelDims) -> int:
    """DeBERTa's relative position embeddings and their norm."""
    if not (is_deberta(cfg) and cfg.get("relative_attention", False)):
        return 0
    buckets = cfg.get("position_buckets", -1)
    max_rel = cfg.get("max_relative_positions", -1)
    if max_rel < 1:
        max_rel = dims.max_position_embeddings
    span = buckets if buckets > 0 else max_rel
    n = 2 * span * dims.hidden_size
    if "layer_norm" in str(cfg.get("norm_rel_ebd", "none")):
        n += 2 * dims.hidden_size
    if not cfg.get("share_att_key", False):
        n += dims.num_layers * 2 * linear_params(dims.hidden_size, dims.hidden_size, True)
    return n


def head_params(cfg: dict, dims: ModelDims, task: str, num_labels: int) -> int:
    """The task head that a prepared run trains (classifier / score); 0 for causal LM."""
    if task != "classification":
        return 0
    h = dims.hidden_size
    if dims.family == "bert":
        if is_roberta(cfg):      # RobertaClassificationHead: dense + out_proj
            return linear_params(h, h, True) + linear_params(h, num_labels, True)
        return linear_params(h, num_labels, True)
    return linear_params(h, num_labels, False)                 # score


def body_head_params(cfg: dict, dims: ModelDims, task: str) -> int:
    """Everything after the blocks except the trainable task head: final norm,
    pooler, LM head (when not tied)."""
    h = dims.hidden_size
    if dims.family == "bert":
        if task == "classification":
            if is_roberta(cfg):
                return 0
            if is_deberta(cfg):
                return linear_params(cfg.get("pooler_hidden_size", h), cfg.get("pooler_hidden_size", h), True)
            return linear_params(h, h, True)                   # BertForSequenceClassification keeps the pooler
        # masked / causal LM head: transform dense + LayerNorm + decoder bias (decoder weight tied)
        return linear_params(h, h, True) + 2 * h + dims.vocab_size
    n = norm_params(dims)                                      # final norm
    if task == "causal_lm" and not dims.tie_word_embeddings:
        n += dims.vocab_size * h
    return n


def count_total_params(cfg: dict, task: Optional[str] = None, num_labels: int = 2) -> int:
    """Exact parameter count of the transformers model for `task`
    (AutoModelForSequenceClassification / AutoModelForCausalLM), tied weights once."""
    dims = model_dims(cfg)
    task = task or default_task(dims)
    return (embedding_params(cfg, dims) + dims.num_layers * block_params(dims) + encoder_extra_params(cfg, dims)
            + body_head_params(cfg, dims, task) + head_params(cfg, dims, task, num_labels))


def frozen_linear_params(dims: ModelDims) -> int:
    """Weights of the block linears: what NF4 quantizes (embeddings, norms, heads stay in 16/32 bit)."""
    return dims.num_layers * sum(s.in_features * s.out_features for s in dims.block_linears())


def count_trainable(spec, method_cfg, dims: ModelDims, cfg: dict, task: str, num_labels: int) -> int:
    """spec.count_trainable(dims, cfg, task), plus the classification head when the
    method leaves it trainable. Raises NotImplementedError for a method without
    an exact count (never a guess)."""
    if spec.count_trainable is None:
        raise NotImplementedError(
            f"method {spec.name!r} has no count_trainable yet, so the estimator cannot give an exact "
            f"trainable-parameter count for it (engine/methods must implement MethodSpec.count_trainable)")
    n = int(spec.count_trainable(dims, method_cfg, task))
    if task == "classification" and spec.trains_head:
        n += head_params(cfg, dims, task, num_labels)
    return n


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------

@dataclass
class Estimate:
    rows: dict                      # bytes (ints): cuda_context, weights, gradients, hidden_states, optimizer, total
    n_params: int
    n_trainable: int
    trainable_ratio: float
    formula: str
    notes: list = field(default_factory=list)
    inputs: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)   # hidden-state parts (bytes), `model` formula only

    @property
    def total(self) -> int:
        return self.rows["total"]

    def to_json(self) -> dict:
        """The contract shape (DESIGN.md): n_params, n_trainable and the rows in bytes."""
        return {"n_params": self.n_params, "n_trainable": self.n_trainable,
                "rows": {k: int(self.rows[k]) for k in ROWS}}

    def to_dict(self) -> dict:
        """Richer form for the UI: rows in bytes and GiB, formula, ratio, notes."""
        return {
            "n_params": self.n_params, "n_trainable": self.n_trainable,
            "trainable_ratio": self.trainable_ratio,
            "trainable_percent": round(100 * self.trainable_ratio, 4),
            "formula": self.formula,
            "formula_text": FORMULA_TEXT[self.formula],
            "rows": {k: int(self.rows[k]) for k in ROWS},
            "rows_gib": {k: round(self.rows[k] / GiB, 3) for k in ROWS},
            "hidden_states_breakdown": {k: int(v) for k, v in self.breakdown.items()},
            "notes": list(self.notes),
            "inputs": dict(self.inputs),
        }

    def human(self) -> str:
        lines = [f"{k:<14} {self.rows[k] / GiB:10.3f} GiB" for k in ROWS]
        lines.append(f"parameters     {self.n_params:,} (trainable {self.n_trainable:,}, "
                     f"{100 * self.trainable_ratio:.4f}%)")
        return "\n".join(lines)


FORMULA_TEXT = {
    "slide": "weights size·N; gradients size·N_trainable; optimizer 2·size·N_trainable; CUDA ≈ 1 GiB; "
             "hidden states size·L·(20·H·seq + 3·seq²)·bs with H = attention heads",
    "appendix": "slide rows; hidden states size·(3·h·seq·bs + 18·L·h·seq·bs + 3·L·heads·seq²·bs + vocab·seq·bs)",
    "model": "exact parameter counts (NF4 with block constants); optimizer states by kind; hidden states = "
             "tensors autograd saves in our training loop, walked per layer for this architecture and method",
}


# ---------------------------------------------------------------------------------------------
# Rows shared by the slide and appendix formulas
# ---------------------------------------------------------------------------------------------

def slide_hidden_states(dims: ModelDims, size: int, batch: int, seq: int) -> int:
    """size·L·(20·H·seq + 3·seq²)·bs, H = number of attention heads (the reading
    that reproduces the slide's Llama-2-7B numbers; see docs/estimator.md)."""
    return size * dims.num_layers * (20 * dims.num_heads * seq + 3 * seq * seq) * batch


def appendix_hidden_states(dims: ModelDims, size: int, batch: int, seq: int) -> int:
    """size·(3·h·seq·bs + 18·L·h·seq·bs + 3·L·heads·seq²·bs + vocab·seq·bs), verbatim."""
    h, L, a, V = dims.hidden_size, dims.num_layers, dims.num_heads, dims.vocab_size
    return size * (3 * h * seq * batch + 18 * L * h * seq * batch + 3 * L * a * seq * seq * batch + V * seq * batch)


def simple_rows(n: int, n_tr: int, size: int, hidden: int) -> dict:
    rows = {"cuda_context": CUDA_CONTEXT_BYTES, "weights": size * n, "gradients": size * n_tr,
            "hidden_states": hidden, "optimizer": 2 * size * n_tr}
    rows["total"] = sum(rows.values())
    return rows


# ---------------------------------------------------------------------------------------------
# The `model` formula: weights, gradients, optimizer
# ---------------------------------------------------------------------------------------------

def quant_of(method_cfg, quant: str) -> str:
    """QLoRA quantizes the frozen weights itself: nf4 (or nf4-dq) even when quant='none'."""
    if getattr(method_cfg, "name", "") == "qlora" and quant == "none":
        return "nf4-dq" if getattr(method_cfg, "double_quant", True) else "nf4"
    return quant


TRAINS_EXISTING = ("full", "top_k", "bitfit", "ln_tuning")   # methods that add no parameters


def added_params(method_name: str, n_tr: int, head: int) -> int:
    """Parameters a method adds to the model (adapters, prompts, LoRA matrices):
    its trainable count minus the (existing) classification head."""
    return 0 if method_name in TRAINS_EXISTING else max(0, n_tr - head)


def model_weight_bytes(dims: ModelDims, n_params: int, added: int, size: int, quant: str, method_name: str) -> int:
    """The base model's parameters plus the method's added ones; frozen block
    linears in NF4 (4 bits + block constants) when quantized, everything else in
    the training dtype. Methods that train the block linears themselves (full,
    top_k) keep those in the training dtype."""
    if quant == "none" or method_name in ("full", "top_k"):
        return size * (n_params + added)
    q = frozen_linear_params(dims)
    bits = NF4_DQ_BITS if quant == "nf4-dq" else NF4_BITS
    return math.ceil(q * bits / 8) + size * (n_params - q + added)


def optimizer_bytes(n_tr: int, size: int, optimizer: str) -> int:
    """AdamW: two states in the parameters' dtype (PyTorch keeps exp_avg and
    exp_avg_sq like the parameter); 8-bit AdamW: two 1-byte states plus an fp32
    constant per block of 2048; plain SGD (no momentum): nothing."""
    if optimizer == "adamw":
        return 2 * size * n_tr
    if optimizer == "adamw8bit":
        return 2 * (n_tr + 4 * math.ceil(n_tr / ADAM8_BLOCK))
    return 0


# ---------------------------------------------------------------------------------------------
# The `model` formula: hidden states (activations saved for backward)
# ---------------------------------------------------------------------------------------------

def _block_paths(dims: ModelDims) -> list[str]:
    return [s.path for s in dims.block_linears()]


def _lora_targets_per_layer(dims: ModelDims, method_cfg, task: str) -> dict[int, dict[str, int]]:
    """{layer: {block-relative path: rank}} for LoRA-family configs."""
    targets = getattr(method_cfg, "target_modules", None) or list(dims.arch.default_lora_targets)
    prefix = dims.arch.blocks_path + "."
    rank = getattr(method_cfg, "r", None) or getattr(method_cfg, "init_r", None) or 8
    out: dict[int, dict[str, int]] = {}
    try:
        from .methods.targeting import resolve_targets_in_dims
        chosen = [lin.name for lin in resolve_targets_in_dims(dims, targets, task)]
    except ImportError:  # pragma: no cover - older targeting module
        import re
        names = [f"{prefix}{i}.{p}" for i in range(dims.num_layers) for p in _block_paths(dims)]
        if isinstance(targets, str):
            chosen = names if targets == "all-linear" else [n for n in names if re.fullmatch(targets, n)]
        else:
            chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    rank_of = None
    try:
        from .methods.lora import module_rank_alpha
        rank_of = lambda n: module_rank_alpha(method_cfg, n)[0]  # noqa: E731
    except (ImportError, AttributeError, TypeError):
        pass
    for name in chosen:
        if not name.startswith(prefix):
            continue
        i, path = name[len(prefix):].split(".", 1)
        r = rank
        if rank_of is not None:
            try:
                r = rank_of(name)
            except Exception:   # a config shape module_rank_alpha does not know (AdaLoRA)
                r = rank
        out.setdefault(int(i), {})[path] = r
    return out


def _bottleneck_width(dims: ModelDims, method_cfg) -> int:
    size = getattr(method_cfg, "bottleneck_size", None)
    if size:
        return int(size)
    red = getattr(method_cfg, "reduction_factor", None) or 16
    return max(1, int(dims.hidden_size // red))


def _layers_subset(dims: ModelDims, method_cfg) -> list[int]:
    layers = getattr(method_cfg, "layers", None)
    return list(range(dims.num_layers)) if not layers else [i for i in layers if 0 <= i < dims.num_layers]


_PLAN_CACHE: dict = {}
_COUNT_CACHE: dict = {}
_CACHE_SIZE = 128


def _cache_key(cfg: dict, method_cfg, task: str, num_labels: int = 0) -> str:
    return json.dumps([cfg, method_cfg.model_dump(mode="json"), task, num_labels], sort_keys=True, default=str)


def _memo(cache: dict, key: str, make):
    """A small bounded memo: the UI and the batch search call estimate() many
    times for the same model and method."""
    if key not in cache:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = make()
    return cache[key]


def activation_plan(dims: ModelDims, method_cfg, task: str) -> Plan:
    """What each block trains, read from the method config. Methods not listed
    here get the plan of a frozen model whose gradient reaches the first layer
    (a lower bound), with a note."""
    name = getattr(method_cfg, "name", "")
    L = dims.num_layers
    layers = [LayerPlan() for _ in range(L)]
    plan = Plan(layers=layers)
    paths = _block_paths(dims)
    if name in ("lora", "dora", "adalora", "qlora"):
        dropout = float(getattr(method_cfg, "dropout", 0.0) or 0.0)
        for i, d in _lora_targets_per_layer(dims, method_cfg, task).items():
            layers[i].lora = {p: (r, dropout) for p, r in d.items()}
            layers[i].dora = name == "dora"
    elif name == "full":
        for lp in layers:
            lp.full, lp.norms = set(paths), True
        plan.embeddings = plan.final_norm = plan.lm_head = plan.pooler = True
    elif name == "top_k":
        k = int(getattr(method_cfg, "k", 2))
        for lp in layers[max(0, L - k):]:
            lp.full, lp.norms = set(paths), True
        plan.final_norm = True
    elif name == "bitfit":
        # bias gradients need no saved input, but the gradient flows from the first bias on
        for lp in layers:
            lp.bias = True
        plan.input_grad = dims.family == "bert"          # the embedding LayerNorm's bias trains
    elif name == "ln_tuning":
        for lp in layers:
            lp.norms = True
        plan.final_norm = True
        plan.input_grad = dims.family == "bert"         # BERT's embedding LayerNorm trains too
    elif name == "ia3":
        ff = getattr(method_cfg, "feedforward_modules", None)
        for lp in layers:
            lp.ia3 = {"k", "v", "ff"} if ff is None or ff else {"k", "v"}
    elif name in ("prompt_tuning", "p_tuning"):
        plan.prompt_tokens = int(getattr(method_cfg, "num_virtual_tokens", 20))
        plan.input_grad = True
    elif name == "prefix_tuning":
        n = int(getattr(method_cfg, "num_virtual_tokens", 20))
        for lp in layers:
            lp.prefix = n
    elif name == "llama_adapter":
        n = int(getattr(method_cfg, "adapter_len", 10))
        top = int(getattr(method_cfg, "adapter_layers", 8))
        for lp in layers[max(0, L - top):]:
            lp.adaption_prompt = n
    elif name in ("houlsby", "parallel_adapter", "mam"):
        width = _bottleneck_width(dims, method_cfg)
        kind = "serial" if name == "houlsby" else "parallel"
        placement = getattr(method_cfg, "placement", "both" if name == "houlsby" else "ffn")
        sites = ["attn", "ffn"] if placement == "both" else [placement]
        for i in _layers_subset(dims, method_cfg):
            layers[i].adapters = [(kind, s, width) for s in sites]
            if name == "houlsby" and getattr(method_cfg, "train_layernorm", True):
                layers[i].norms = True
        if name == "mam":
            n = int(getattr(method_cfg, "num_virtual_tokens", 30))
            for lp in layers:
                lp.prefix = n
    elif name == "s4":
        s4_plan(dims, method_cfg, layers, plan)
    else:
        plan.input_grad = True
        plan.notes.append(f"hidden states for {name!r} are modelled as a frozen model with gradients from the "
                          f"first layer on (its own extra tensors are not modelled yet)")
    return plan


def s4_plan(dims: ModelDims, method_cfg, layers: list, plan: Plan) -> None:
    """S4 (Chen et al. 2023): per layer group, adapters / prefix / BitFit / LoRA on q and v.
    Every layer gets the longest prefix's slots (masked where a group has none)."""
    from .methods.s4 import group_layers
    groups = getattr(method_cfg, "groups", [])
    placement = getattr(method_cfg, "adapter_placement", "both")
    sites = ["attn", "ffn"] if placement == "both" else [placement]
    qv = [x.path for x in dims.block_linears()][0:3:2] if dims.family != "gpt2" else [dims.block_linears()[0].path]
    n_max = max([g.prefix_tokens for g in groups if "prefix" in g.strategies] or [0])
    for g, idx in zip(groups, group_layers(dims.num_layers, getattr(method_cfg, "pattern", "spindle"))):
        for i in idx:
            lp = layers[i]
            if "adapter" in g.strategies:
                lp.adapters = [("serial", site, g.adapter_size) for site in sites]
            if "prefix" in g.strategies:
                lp.prefix = n_max
            if "lora" in g.strategies:
                lp.lora = {p: (g.lora_r, 0.0) for p in qv}
            if "bitfit" in g.strategies:
                lp.bias = True
    if n_max:
        for lp in layers:
            lp.prefix = lp.prefix or n_max


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
                shape: Shape, rg_in: bool) -> bool:
    """One linear layer reading x: what it saves (its input when its weight
    trains; LoRA's input, dropout and rank-r output; DoRA's scaled output) and
    whether its output requires grad."""
    a, T = shape.a, shape.tokens
    trains = path in lp.full
    if trains:
        saved.add(x_key, x_numel * a)
    if path in lp.lora:
        r, p = lp.lora[path]
        if p > 0:
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
    mean, rstd). Returns whether the output requires grad."""
    h, a = dims.hidden_size, shape.a
    if not (rg or trains):
        return False
    if dims.norm == "rmsnorm":
        if rg:
            saved.add(key + ".in_fp32", n_tok * h * 4)        # x.float() (same storage as x in fp32)
            saved.add(key + ".rsqrt", n_tok * 4)
        if trains:
            saved.add(key + ".normed", n_tok * h * a)
    else:
        saved.add(key + ".in", n_tok * h * a)
        saved.add(key + ".stats", n_tok * 8)                  # mean and rstd, fp32
    return True


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
                   rg_v: bool, dropout_p: float, causal_rope: bool) -> None:
    """What attention saves, given which of q, k, v require grad."""
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
        saved.add("attn.q", T * hq * a)
        # eager attention repeats grouped k/v to every head (a copy when n_rep > 1)
        saved.add("attn.k", B * Skv * (hq if n_rep > 1 else kv) * a)
        saved.add("attn.v", B * Skv * (hq if n_rep > 1 else kv) * a)
        probs = B * heads * S * Skv
        if dims.family == "llama" and eager:
            saved.add("attn.probs_fp32", probs * 4)           # softmax in fp32, cast back for p @ v
            if a != 4:
                saved.add("attn.probs_cast", probs * a)
        else:
            saved.add("attn.probs", probs * a)
        if dropout_p > 0:
            saved.add("attn.dropout_mask", probs * dropout_mask_bytes(shape))
            saved.add("attn.probs_dropped", probs * a)
        return
    # SDPA flash / memory-efficient: q, k, v, output and the fp32 log-sum-exp; no seq² tensor.
    # With an explicit mask (prefix slots) transformers repeats grouped k/v to every head and
    # the kernel keeps the float mask.
    masked = lp.prefix > 0
    kv_w = hq if masked else kv
    saved.add("attn.q", T * hq * a)
    saved.add("attn.k", B * Skv * kv_w * a)
    saved.add("attn.v", B * Skv * kv_w * a)
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
    return any_


def llama_block(lp: LayerPlan, dims: ModelDims, shape: Shape, rg: bool, dropout_p: float) -> tuple[int, bool, dict]:
    """Saved bytes of one Llama block given whether its input requires grad."""
    s = Saved()
    T, a, h, i = shape.tokens, shape.a, dims.hidden_size, dims.intermediate_size
    hq, kv = dims.num_heads * dims.head_dim, dims.kv_dim
    p = {x.short: x.path for x in dims.block_linears()}
    rg_n1 = norm_site(s, "ln1", shape, dims, rg, lp.norms, T) or lp.bias
    rg_q = linear_site(lp, p["q_proj"], s, "n1", T * h, hq, shape, rg_n1)
    rg_k = linear_site(lp, p["k_proj"], s, "n1", T * h, kv, shape, rg_n1)
    rg_v = linear_site(lp, p["v_proj"], s, "n1", T * h, kv, shape, rg_n1)
    if "k" in lp.ia3:
        s.add("ia3.k", T * kv * a)
        rg_k = True
    if "v" in lp.ia3:
        s.add("ia3.v", T * kv * a)
        rg_v = True
    if lp.prefix:
        rg_k = rg_v = True
    attention_site(lp, s, dims, shape, rg_q, rg_k, rg_v, dropout_p, True)
    rg_attn = rg_q or rg_k or rg_v
    if lp.adaption_prompt:       # LLaMA-Adapter's gated prompt attention: its own q, fp32 softmax, gated probs
        probs = shape.batch * dims.num_heads * shape.q_len * lp.adaption_prompt
        s.add("adaption.q", T * hq * a)
        s.add("adaption.probs_fp32", probs * 4)
        s.add("adaption.probs_gated", probs * a)
        s.add("adaption.out", T * hq * a)
        rg_attn = True
    rg_o = linear_site(lp, p["o_proj"], s, attention_output_key(shape, dropout_p), T * hq, h, shape, rg_attn)
    rg_o = adapter_site(lp, "attn", s, shape, dims, "attn_o") or rg_o
    rg2 = rg or rg_o
    rg_n2 = norm_site(s, "ln2", shape, dims, rg2, lp.norms, T) or lp.bias
    par = adapter_site(lp, "ffn", s, shape, dims, "n2") if any(k == "parallel" for k, *_ in lp.adapters) else False
    rg_g = linear_site(lp, p["gate_proj"], s, "n2", T * h, i, shape, rg_n2)
    rg_u = linear_site(lp, p["up_proj"], s, "n2", T * h, i, shape, rg_n2)
    # the engine's fused SwiGLU (engine.kernels) keeps silu's input, not its output:
    # gate(x) for either gradient, up(x) for gate's
    if rg_g or rg_u:
        s.add("mlp.gate", T * i * a)
    if rg_g:
        s.add("mlp.up", T * i * a)
    rg_prod = rg_g or rg_u
    if "ff" in lp.ia3:
        s.add("ia3.ff", T * i * a)
        rg_prod = True
    rg_d = linear_site(lp, p["down_proj"], s, "mlp.prod", T * i, h, shape, rg_prod)
    if any(k == "serial" for k, *_ in lp.adapters):
        rg_d = adapter_site(lp, "ffn", s, shape, dims, "ffn_out") or rg_d
    return s.total, rg2 or rg_d or par, s.parts


def bert_block(lp: LayerPlan, dims: ModelDims, shape: Shape, rg: bool, cfg: dict) -> tuple[int, bool, dict]:
    """Saved bytes of one post-LayerNorm BERT block (dropout on in training)."""
    s = Saved()
    T, a, h, i = shape.tokens, shape.a, dims.hidden_size, dims.intermediate_size
    pd = float(cfg.get("hidden_dropout_prob", cfg.get("resid_pdrop", 0.1)) or 0.0)
    ad = float(cfg.get("attention_probs_dropout_prob", cfg.get("attn_pdrop", 0.1)) or 0.0)
    paths = _block_paths(dims)
    q_p, k_p, v_p, o_p, in_p, out_p = paths[:6] if dims.family == "bert" else (paths[0],) * 3 + tuple(paths[1:4])
    rg_x = rg or lp.bias
    rg_q = linear_site(lp, q_p, s, "x", T * h, h, shape, rg_x)
    rg_k = linear_site(lp, k_p, s, "x", T * h, h, shape, rg_x)
    rg_v = linear_site(lp, v_p, s, "x", T * h, h, shape, rg_x)
    if "k" in lp.ia3:
        s.add("ia3.k", T * h * a)
        rg_k = True
    if "v" in lp.ia3:
        s.add("ia3.v", T * h * a)
        rg_v = True
    if lp.prefix:
        rg_k = rg_v = True
    attention_site(lp, s, dims, shape, rg_q, rg_k, rg_v, ad, False)
    rg_att = rg_q or rg_k or rg_v
    rg_o = linear_site(lp, o_p, s, attention_output_key(shape, ad), T * h, h, shape, rg_att)
    if rg_o and pd > 0:
        s.add("attn.out_dropout_mask", T * h * dropout_mask_bytes(shape))
    rg_o = adapter_site(lp, "attn", s, shape, dims, "attn_o") or rg_o
    rg1 = norm_site(s, "ln1", shape, dims, rg or rg_o or lp.bias, lp.norms, T)
    par = adapter_site(lp, "ffn", s, shape, dims, "ln1_out") if any(k == "parallel" for k, *_ in lp.adapters) \
        else False
    rg_in = linear_site(lp, in_p, s, "ln1_out", T * h, i, shape, rg1)
    if rg_in:
        s.add("ffn.gelu_in", T * i * a)
    rg_ff = rg_in
    if "ff" in lp.ia3:
        s.add("ia3.ff", T * i * a)
        rg_ff = True
    rg_out = linear_site(lp, out_p, s, "ffn.act", T * i, h, shape, rg_ff)
    if rg_out and pd > 0:
        s.add("ffn.out_dropout_mask", T * h * dropout_mask_bytes(shape))
    if any(k == "serial" for k, *_ in lp.adapters):
        rg_out = adapter_site(lp, "ffn", s, shape, dims, "ffn_out") or rg_out
    rg2 = norm_site(s, "ln2", shape, dims, rg1 or rg_out or par, lp.norms, T)
    return s.total, rg2, s.parts


def model_hidden_states(cfg: dict, dims: ModelDims, plan: Plan, *, batch: int, seq: int, size: int, task: str,
                        attention: str, device: str, grad_checkpointing: bool) -> tuple[int, dict]:
    """Bytes autograd saves during one forward of our training loop; with a
    breakdown {part: bytes}."""
    shape = Shape(batch=batch, seq=seq, prompt=plan.prompt_tokens, prefix=0, a=size, device=device,
                  attention="eager" if attention == "eager" else "sdpa")
    T, h, a = shape.tokens, dims.hidden_size, size
    parts: dict[str, int] = {}
    # embeddings
    rg = plan.input_grad or plan.prompt_tokens > 0
    emb = Saved()
    if plan.embeddings:
        emb.add("embed.ids", batch * seq * 8)
        rg = True
    if dims.family == "bert":
        rg = norm_site(emb, "embed.ln", shape, dims, rg, plan.embeddings or plan.input_grad, T) or rg
        pd = float(cfg.get("hidden_dropout_prob", 0.1) or 0.0)
        if rg and pd > 0:
            emb.add("embed.dropout_mask", T * h * dropout_mask_bytes(shape))
    parts["embeddings"] = emb.total
    # blocks
    dropout_p = float(cfg.get("attention_dropout", 0.0) or 0.0)
    per_layer = []
    seen: dict = {}      # most blocks share one plan: work each distinct (plan, grad-in) out once
    for lp in plan.layers:
        key = (repr(lp), rg)
        if key not in seen:
            if dims.family == "llama":
                seen[key] = llama_block(lp, dims, shape, rg, dropout_p)[:2]
            else:
                seen[key] = bert_block(lp, dims, shape, rg, cfg)[:2]
        nbytes, rg = seen[key]
        per_layer.append(nbytes)
    if grad_checkpointing:
        # each block keeps only its input; one block is recomputed at a time in backward
        parts["layer_inputs"] = sum(T * h * a for n in per_layer if n)
        parts["recomputed_block"] = max(per_layer) if per_layer else 0
    else:
        parts["blocks"] = sum(per_layer)
    # tail: final norm, heads, loss
    tail = Saved()
    if dims.family == "llama":
        rg_f = norm_site(tail, "final_norm", shape, dims, rg, plan.final_norm, T)
        if task == "causal_lm":
            n = batch * (seq - 1)
            tail.add("loss.hidden", T * h * a)                 # final hidden and its shifted copy
            if batch > 1 or plan.prompt_tokens:
                tail.add("loss.shifted", n * h * a)
            tail.add("loss.index", n * 9)                      # kept-token mask and indices
            chunk = min(n, LOSS_CHUNK)
            tail.add("loss.logits_chunk_fp32", chunk * dims.vocab_size * 4)
            if plan.lm_head:
                # a training LM head: the single-pass loss accumulates its fp32 weight
                # gradient during forward and keeps it for backward
                tail.add("loss.head_grad_fp32", dims.vocab_size * h * 4)
            if a != 4:
                tail.add("loss.logits_chunk", chunk * dims.vocab_size * a)
        else:
            if plan.head or rg_f:
                tail.add("score.in", T * h * a)
    else:
        if task == "classification":
            tail.add("pooler", batch * h * a * 2 + batch * h * dropout_mask_bytes(shape))
        else:
            n = batch * seq
            tail.add("mlm.transform", T * h * a * 3)
            tail.add("loss.logits_fp32", n * dims.vocab_size * 4)
    parts["head_and_loss"] = tail.total
    return sum(parts.values()), parts


# ---------------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------------

def _validate(choice: str, options: tuple, field_name: str) -> str:
    if choice not in options:
        raise ValueError(f"{field_name}: {choice!r} is not one of {', '.join(options)}")
    return choice


def _method(method) -> Any:
    from .methods import MethodConfig, parse_method_config
    if isinstance(method, MethodConfig):
        return method
    if isinstance(method, str):
        method = {"name": method}
    try:
        return parse_method_config(method)
    except ValueError as e:
        if hasattr(e, "errors"):       # pydantic ValidationError
            from .config import format_validation_error
            raise ValueError(format_validation_error(e, prefix="method.")) from None
        raise


def estimate(model: Union[str, dict], method: Union[dict, Any], *, batch_size: int = 8, seq_len: int = 128,
             dtype: str = "fp32", quant: str = "none", optimizer: str = "adamw", grad_checkpointing: bool = False,
             formula: str = "model", task: Optional[str] = None, num_labels: int = 2, attention: str = "sdpa",
             n_params_override: Optional[int] = None, n_trainable_override: Optional[int] = None,
             device: str = "cuda") -> Estimate:
    """Estimate the memory of one training step. `model`: a bundled or catalog
    name, a path to a config.json, or a config dict. `method`: a method config
    dict (validated) or MethodConfig. All rows in bytes.

    `n_params_override` / `n_trainable_override` replace the exact counts (the
    slide's N = 7e9). `device='cpu'` models CPU kernels (dropout masks in the
    activation dtype, SDPA's math path under dropout) for comparison with
    measurements taken on CPU."""
    _validate(formula, FORMULAS, "formula")
    _validate(dtype, tuple(DTYPE_BYTES), "dtype")
    _validate(quant, QUANTS, "quant")
    _validate(optimizer, OPTIMIZERS, "optimizer")
    _validate(attention, ATTENTIONS, "attention")
    _validate(device, DEVICES, "device")
    if task is not None:
        _validate(task, TASKS, "task")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: must be an integer >= 2, got {seq_len!r}")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels: must be a positive integer, got {num_labels!r}")
    from .methods import get_method

    cfg = load_model_config(model)
    dims = model_dims(cfg)
    # count_trainable implementations that count the classification head themselves (`full`) read it
    dims = dataclasses.replace(dims, num_labels=num_labels)
    task = task or default_task(dims)
    mcfg = _method(method)
    spec = get_method(mcfg.name)
    size = DTYPE_BYTES[dtype]
    notes: list[str] = []
    n_params = int(n_params_override) if n_params_override is not None else count_total_params(cfg, task, num_labels)
    if n_trainable_override is not None:
        n_tr = int(n_trainable_override)
    else:
        n_tr = _memo(_COUNT_CACHE, _cache_key(cfg, mcfg, task, num_labels),
                     lambda: count_trainable(spec, mcfg, dims, cfg, task, num_labels))
    if seq_len > dims.max_position_embeddings:
        notes.append(f"seq_len {seq_len} is beyond the model's max_position_embeddings "
                     f"({dims.max_position_embeddings})")
    inputs = {"model": model if isinstance(model, str) else cfg.get("model_type"), "method": mcfg.model_dump(),
              "batch_size": batch_size, "seq_len": seq_len, "dtype": dtype, "quant": quant, "optimizer": optimizer,
              "grad_checkpointing": grad_checkpointing, "task": task, "num_labels": num_labels,
              "attention": attention, "device": device}
    breakdown: dict = {}
    if formula in ("slide", "appendix"):
        hidden = (slide_hidden_states if formula == "slide" else appendix_hidden_states)(dims, size, batch_size,
                                                                                            seq_len)
        rows = simple_rows(n_params, n_tr, size, hidden)
        if quant != "none" or optimizer != "adamw" or grad_checkpointing:
            notes.append(f"the {formula} formula ignores quantization, the optimizer kind and gradient "
                         f"checkpointing (16/32-bit weights, two optimizer states)")
    else:
        q = quant_of(mcfg, quant)
        if q != quant:
            notes.append(f"{mcfg.name} quantizes the frozen block linears: weights counted as {q}")
        plan = _memo(_PLAN_CACHE, _cache_key(cfg, mcfg, task), lambda: activation_plan(dims, mcfg, task))
        head = head_params(cfg, dims, task, num_labels) if spec.trains_head else 0
        added = added_params(mcfg.name, n_tr, head)
        notes.extend(plan.notes)
        if dims.family == "gpt2" or is_deberta(cfg):
            notes.append("hidden states for GPT-2 / DeBERTa use the BERT-style block (not checked by measurement)")
        hidden, breakdown = model_hidden_states(cfg, dims, plan, batch=batch_size, seq=seq_len, size=size, task=task,
                                                attention=attention, device=device,
                                                grad_checkpointing=grad_checkpointing)
        rows = {"cuda_context": CUDA_CONTEXT_BYTES if device == "cuda" else 0,
                "weights": model_weight_bytes(dims, n_params, added, size, q, mcfg.name),
                "gradients": size * n_tr,
                "hidden_states": hidden,
                "optimizer": optimizer_bytes(n_tr, size, optimizer)}
        rows["total"] = sum(rows.values())
        if task == "causal_lm":
            notes.append(f"logits: our chunked cross-entropy keeps one fp32 chunk of ≤{LOSS_CHUNK} tokens × vocab")
        if optimizer == "sgd":
            notes.append("sgd: plain SGD without momentum keeps no optimizer state")
    rows = {k: int(v) for k, v in rows.items()}
    return Estimate(rows=rows, n_params=n_params, n_trainable=n_tr,
                    trainable_ratio=(n_tr / n_params if n_params else 0.0), formula=formula, notes=notes,
                    inputs=inputs, breakdown=breakdown)


def largest_batch_that_fits(gpu_bytes: int, model: Union[str, dict], method, *, max_batch: int = 4096,
                            **kwargs) -> int:
    """The largest batch size whose estimated total fits in `gpu_bytes` (0 if
    even one sequence does not). Memory grows with the batch, so this bisects."""
    kwargs.pop("batch_size", None)

    def total(b: int) -> int:
        return estimate(model, method, batch_size=b, **kwargs).rows["total"]

    if total(1) > gpu_bytes:
        return 0
    lo, hi = 1, 2
    while hi <= max_batch and total(hi) <= gpu_bytes:
        lo, hi = hi, hi * 2
    hi = min(hi, max_batch + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(mid) <= gpu_bytes:
            lo = mid
        else:
            hi = mid
    return lo


def gpu_fits(model: Union[str, dict], method, **kwargs) -> list[dict]:
    """For each common GPU size (16/24/40/48/80 GB): whether the estimate fits,
    and the largest batch that would."""
    est = estimate(model, method, **kwargs)
    out = []
    for name, nbytes in GPU_PRESETS:
        out.append({"name": name, "bytes": nbytes, "fits": est.rows["total"] <= nbytes,
                    "largest_batch": largest_batch_that_fits(nbytes, model, method, **kwargs)})
    return out
