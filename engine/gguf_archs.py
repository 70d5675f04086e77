"""What each llama.cpp architecture needs of a GGUF file: the hyperparameter keys, which
tensors it holds and how Hugging Face weights are transformed into them.

`Arch.gguf_arch` (engine.arch) names the llama.cpp architecture a family is written as,
`Arch.gguf_rope` its RoPE, `Arch.norm_plus_one` Gemma's norms and `Arch.gguf_rules` the
further keys and checks (`RULES` below) its architecture needs. Facts this follows
(llama.cpp's convert_hf_to_gguf.py and src/llama-model.cpp are the reference):

- RoPE: llama.cpp's "normal" RoPE (llama, granite, smollm3; Mixtral is written as
  "llama" with experts) rotates adjacent pairs, so q/k rows are reordered per head from
  Hugging Face's rotate-half layout. The "neox" archs (qwen2, qwen3, qwen3moe, olmo2,
  gemma2, gemma3, phi3) rotate halves as Hugging Face does: rows stay.
- Gemma's RMSNorm computes x·(1+w); llama.cpp's x·w, so every norm weight is written +1.
- Gemma 2 and 3 scale queries by 1/sqrt(head_dim) in llama.cpp (1/sqrt(hidden/heads) for
  the 27B sizes, told apart by their layer count 46 / 62): Hugging Face's
  query_pre_attn_scalar must say the same. Sliding layers: Gemma 2 every other one from
  layer 0, Gemma 3 five of every six; Gemma 3's sliding layers use RoPE base 10000.
- SmolLM3: llama.cpp skips RoPE on every 4th layer (a fixed step, no GGUF key).
- Mixture of experts: transformers' fused (E, 2I, H) gate_up_proj is split into
  ffn_gate_exps and ffn_up_exps (gate first), down_proj (E, H, I) is ffn_down_exps, the
  router ffn_gate_inp. llama.cpp renormalises the top-k weights (Mixtral does; Qwen3-MoE
  needs norm_topk_prob).
- Granite's multipliers are the embedding_scale / residual_scale / attention.scale /
  logit_scale keys (llama.cpp divides the logits by logit_scale).
- GPT-2: Conv1D weights are stored (in, out) and transposed; learned positions
  (position_embd), LayerNorms with biases (layer_norm_epsilon), no RoPE keys.
- Phi-3 keeps its fused attn_qkv and a 2I-row ffn_up (gate rows first); Phi-3 and
  OLMo 2 size attention as hidden x hidden (heads · head_dim must be hidden_size).
- llama.cpp's olmo2 requires output.weight (a tied model gets a copy of the
  embeddings); its gemma2 always reuses the embeddings (an untied one is refused).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .arch import Arch, arch_for_model_type, gguf_families


class GGUFExportError(ValueError):
    """A model or tokenizer this exporter cannot express in GGUF; the message says why."""


def _refuse(arch: Arch, what: str) -> GGUFExportError:
    return GGUFExportError(f"GGUF export of {arch.family}: {what}")


def _experts(cfg: dict, arch: Arch, hp: dict) -> dict:
    if arch.experts is None:
        return {}
    e = arch.experts
    count = cfg.get(e.num_key, cfg.get("num_local_experts"))   # transformers may save either spelling
    return {"expert_count": int(count), "expert_used_count": int(cfg[e.active_key]),
            "expert_feed_forward_length": int(cfg[e.intermediate_key])}


def _topk_renormalised(cfg: dict, arch: Arch, hp: dict) -> dict:
    if not cfg.get("norm_topk_prob"):
        raise _refuse(arch, f"norm_topk_prob is false, but llama.cpp's {arch.gguf_arch} always renormalises the "
                            f"chosen experts' weights")
    if int(cfg.get("decoder_sparse_step") or 1) != 1 or cfg.get("mlp_only_layers"):
        raise _refuse(arch, f"decoder_sparse_step / mlp_only_layers make dense layers, which llama.cpp's "
                            f"{arch.gguf_arch} does not have")
    return {}


def _nope_every_4th(cfg: dict, arch: Arch, hp: dict) -> dict:
    want = [int((i + 1) % 4 != 0) for i in range(hp["block_count"])]
    got = cfg.get("no_rope_layers")
    if got is not None and [int(x) for x in got] != want:
        raise _refuse(arch, f"no_rope_layers {list(got)} differ from llama.cpp's fixed pattern (no RoPE on every "
                            f"4th layer: {want})")
    return {}


def _multipliers(cfg: dict, arch: Arch, hp: dict) -> dict:
    return {"embedding_scale": float(cfg.get("embedding_multiplier", 1.0)),
            "residual_scale": float(cfg.get("residual_multiplier", 1.0)),
            "attention.scale": float(cfg.get("attention_multiplier", 1.0)),
            "logit_scale": float(cfg.get("logits_scaling", 1.0))}


def _sliding(cfg: dict, arch: Arch, hp: dict, period: int) -> dict:
    n = hp["block_count"]
    want = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    got = cfg.get("layer_types") or want
    if list(got) != want:
        raise _refuse(arch, f"layer_types {list(got)} differ from llama.cpp's fixed pattern (one full-attention "
                            f"layer in every {period}: {want})")
    big = {2: 46, 6: 62}[period]   # the 27B sizes, where llama.cpp scales queries by hidden/heads
    scale = hp["embedding_length"] / hp["head_count"] if n == big else hp["head_dim"]
    qpas = cfg.get("query_pre_attn_scalar")
    if qpas is not None and float(qpas) != float(scale):
        raise _refuse(arch, f"query_pre_attn_scalar is {qpas}, but llama.cpp scales queries by 1/sqrt({scale:g}) "
                            f"for this size (head_dim {hp['head_dim']}, {n} layers)")
    window = cfg.get("sliding_window")
    return {"attention.sliding_window": int(window)} if window else {}


def _softcap_always(cfg: dict, arch: Arch, hp: dict) -> dict:
    out = {}
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not cfg.get(key):   # llama.cpp defaults these to 50 / 30 when the key is absent
            raise _refuse(arch, f"{key} is off, but llama.cpp's {arch.gguf_arch} always soft-caps (50 / 30 by "
                                f"default)")
        out[key] = float(cfg[key])
    return out


def _no_softcap(cfg: dict, arch: Arch, hp: dict) -> dict:
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key):
            raise _refuse(arch, f"{key} is {cfg[key]}, but llama.cpp's {arch.gguf_arch} does not soft-cap")
    return {}


def _swa_rope_10000(cfg: dict, arch: Arch, hp: dict) -> dict:
    if hp["rope_freq_base_swa"] not in (None, 10000.0):
        raise _refuse(arch, f"the sliding layers' RoPE base is {hp['rope_freq_base_swa']:g}, but llama.cpp's "
                            f"{arch.gguf_arch} fixes it at 10000")
    return {}


def _output_required(cfg: dict, arch: Arch, hp: dict) -> dict:
    hp["output_required"] = True   # a tied model's output.weight is written, a copy of token_embd
    return {}


def _tied_output(cfg: dict, arch: Arch, hp: dict) -> dict:
    if not hp["tied"]:
        raise _refuse(arch, f"tie_word_embeddings is false, but llama.cpp's {arch.gguf_arch} always uses the "
                            f"embeddings as the output layer")
    return {}


def _square_attention(cfg: dict, arch: Arch, hp: dict) -> dict:
    if hp["head_count"] * hp["head_dim"] != hp["embedding_length"]:
        raise _refuse(arch, f"head_dim {hp['head_dim']} x {hp['head_count']} heads is not hidden_size "
                            f"{hp['embedding_length']}, which llama.cpp's {arch.gguf_arch} assumes")
    return {}


def _sliding_window(cfg: dict, arch: Arch, hp: dict) -> dict:
    window = cfg.get("sliding_window")
    return {"attention.sliding_window": int(window)} if window else {}


# Arch.gguf_rules -> (config dict, Arch, hyperparameters) -> further metadata {key suffix
# after "<arch>.": value}, raising GGUFExportError where llama.cpp would compute otherwise
RULES: dict[str, Callable[[dict, Arch, dict], dict]] = {
    "experts": _experts,
    "topk_renormalised": _topk_renormalised,
    "nope_every_4th": _nope_every_4th,
    "multipliers": _multipliers,
    "swa_every_2nd": lambda cfg, arch, hp: _sliding(cfg, arch, hp, 2),
    "swa_5_of_6": lambda cfg, arch, hp: _sliding(cfg, arch, hp, 6),
    "softcap_always": _softcap_always,
    "no_softcap": _no_softcap,
    "swa_rope_10000": _swa_rope_10000,
    "sliding_window": _sliding_window,
    "output_required": _output_required,
    "tied_output": _tied_output,
    "square_attention": _square_attention,
}


# ------------------------------------------------------------------ hyperparameters

def arch_of_config(cfg: dict) -> Arch:
    """The description of a config dict, refused (naming the families written) unless
    this exporter writes it as a causal LM."""
    kind = cfg.get("model_type") or "unknown"
    try:
        arch = arch_for_model_type(kind)
    except ValueError:
        arch = None
    if arch is None or arch.gguf_arch is None:
        raise GGUFExportError(f"GGUF export supports the decoder families llama.cpp runs; this model is {kind} "
                              f"(this exporter writes {', '.join(gguf_families())})")
    archs = cfg.get("architectures") or ["ForCausalLM"]
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):   # GPT2LMHeadModel
        raise GGUFExportError(f"GGUF export needs a causal language model (…ForCausalLM); this model is "
                              f"{archs[0]}")
    return arch


def _rope(cfg: dict, arch: Arch) -> tuple[float, Optional[float], float]:
    """(base, sliding layers' base or None, rotated fraction of head_dim); plain RoPE only."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    per_type = {k: v for k, v in rope.items() if isinstance(v, dict)}
    full = per_type.get("full_attention", rope)
    for r in [full] + list(per_type.values()):
        kind = r.get("rope_type") or r.get("type") or "default"
        if kind != "default":
            raise _refuse(arch, f"RoPE scaling {kind!r} is not supported (only plain RoPE)")
    theta = float(full.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    swa = per_type.get("sliding_attention")
    swa_theta = float(swa.get("rope_theta", 10000.0)) if swa else cfg.get("rope_local_base_freq")
    frac = float(full.get("partial_rotary_factor", cfg.get("partial_rotary_factor") or 1.0))
    return theta, (None if swa_theta is None else float(swa_theta)), frac


def _first(cfg: dict, *keys: str, default=None):
    """The value of the first of `keys` the config dict has (GPT-2's config spells
    hidden_size n_embd, and so on)."""
    return next((cfg[k] for k in keys if cfg.get(k) is not None), default)


def gguf_hparams(cfg: dict) -> dict:
    """The llama.cpp architecture and hyperparameters of a Hugging Face config
    dict, validated against what llama.cpp computes for that architecture."""
    arch = arch_of_config(cfg)
    heads = int(_first(cfg, "num_attention_heads", "n_head"))
    kv = int(cfg.get("num_key_value_heads") or heads)
    hidden = int(_first(cfg, "hidden_size", "n_embd"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv:
        raise _refuse(arch, f"{heads} attention heads are not a multiple of {kv} KV heads")
    act = _first(cfg, "hidden_act", "hidden_activation", "activation_function")
    if act is not None and act != arch.activation:
        raise _refuse(arch, f"hidden_act {act!r} is not the {arch.activation} llama.cpp's {arch.gguf_arch} uses")
    for key in ("use_sliding_window",):
        if cfg.get(key):
            raise _refuse(arch, f"{key} is set; llama.cpp's {arch.gguf_arch} attends to the whole context")
    theta, theta_swa, frac = _rope(cfg, arch) if arch.positions == "rope" else (None, None, 0.0)
    hp = {"arch": arch, "gguf_arch": arch.gguf_arch,
          "context_length": int(_first(cfg, "max_position_embeddings", "n_positions", default=2048)),
          "embedding_length": hidden, "block_count": int(_first(cfg, "num_hidden_layers", "n_layer")),
          "feed_forward_length": int(_first(cfg, "intermediate_size", "n_inner", default=4 * hidden)),
          "head_count": heads, "head_count_kv": kv, "head_dim": head_dim, "rope_freq_base": theta,
          "rope_freq_base_swa": theta_swa, "rope_dimension_count": int(head_dim * frac),
          "norm_eps": float(_first(cfg, "rms_norm_eps", "layer_norm_epsilon", default=1e-6)),
          "vocab_size": int(cfg["vocab_size"]), "tied": bool(cfg.get("tie_word_embeddings", False))}
    hp["extras"] = {}
    for rule in arch.gguf_rules:
        hp["extras"].update(RULES[rule](cfg, arch, hp))
    return hp


def write_hparams(w, hp: dict) -> None:
    """The <arch>.* metadata of `hp` into GGUFWriter `w`."""
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    if hp["arch"].positions == "rope":
        w.add_rope_dimension_count(hp["rope_dimension_count"])
        w.add_rope_freq_base(hp["rope_freq_base"])
    if hp["arch"].norm == "layernorm":
        w.add_layer_norm_eps(hp["norm_eps"])
    else:
        w.add_layer_norm_rms_eps(hp["norm_eps"])
    w.add_vocab_size(hp["vocab_size"])
    for suffix, v in hp["extras"].items():
        key = f"{hp['gguf_arch']}.{suffix}"
        if isinstance(v, bool):
            w.add_bool(key, v)
        elif isinstance(v, int):
            w.add_uint32(key, v)
        else:
            w.add_float32(key, float(v))


# ------------------------------------------------------------------ tensors

def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's rotate-half layout to llama.cpp's (per head,
    rows (2, d/2) -> (d/2, 2)); works for weights (2-D) and biases (1-D)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NOT_WRITTEN = ("ROPE_FREQS", "ATTN_ROT_EMBD", "ROPE_FACTORS_LONG", "ROPE_FACTORS_SHORT")


def allowed_tensors(gguf_arch: str) -> set:
    """The MODEL_TENSOR kinds this exporter writes for a llama.cpp architecture."""
    import gguf

    return {t for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[gguf_arch.upper()]] if t.name not in _NOT_WRITTEN}


def _expert_tensors(hp: dict, hf_name: str, w: np.ndarray) -> Optional[list[tuple[str, np.ndarray]]]:
    """GGUF expert tensors of a fused 3-D transformers expert parameter, None when
    `hf_name` is not one."""
    import gguf

    arch: Arch = hp["arch"]
    if arch.experts is None:
        return None
    prefix, _, rest = hf_name.partition(arch.blocks_path + ".")
    bid, _, tail = rest.partition(".")
    if prefix or not bid.isdigit() or not tail.startswith(arch.experts.path + "."):
        return None
    param = tail[len(arch.experts.path) + 1:]
    name = lambda kind: gguf.TENSOR_NAMES[kind].format(bid=int(bid)) + ".weight"  # noqa: E731
    T = gguf.MODEL_TENSOR
    if param == "gate_up_proj" and w.ndim == 3:
        half = w.shape[1] // 2
        return [(name(T.FFN_GATE_EXP), w[:, :half]), (name(T.FFN_UP_EXP), w[:, half:])]
    if param == "down_proj" and w.ndim == 3:
        return [(name(T.FFN_DOWN_EXP), w)]
    return None


def _block_relative(arch: Arch, hf_name: str) -> str:
    """`hf_name` without its blocks_path.N. prefix ("" outside the blocks)."""
    head, _, rest = hf_name.partition(arch.blocks_path + ".")
    bid, _, tail = rest.partition(".")
    return tail if not head and bid.isdigit() else ""


def gguf_tensors(hp: dict, tensors) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) for every weight; unknown
    tensors are refused rather than dropped."""
    import gguf

    arch: Arch = hp["arch"]
    pairwise = arch.gguf_rope == "normal"
    conv1d = {f"{lin.path}.weight" for lin in arch.linears}
    ga = gguf.MODEL_ARCH[hp["gguf_arch"].upper()]
    names = gguf.get_tensor_name_map(ga, hp["block_count"])
    allowed = allowed_tensors(hp["gguf_arch"])
    T = gguf.MODEL_TENSOR
    for hf_name, t in tensors:
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue   # recomputed from rope_freq_base
        if hf_name == "lm_head.weight" and hp["tied"]:
            continue   # tied: the loader reuses token_embd.weight (or it is written as output.weight below)
        w = t.detach().to("cpu", torch.float32).numpy()
        experts = _expert_tensors(hp, hf_name, w)
        if experts is not None:
            yield from experts
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise GGUFExportError(f"GGUF export: tensor {hf_name!r} has no place in a {hp['gguf_arch']} GGUF file "
                                  f"({arch.family})")
        kind, name = found
        if pairwise and kind == T.ATTN_Q:
            w = permute_rows(w, hp["head_count"])
        elif pairwise and kind == T.ATTN_K:
            w = permute_rows(w, hp["head_count_kv"])
        if arch.conv1d and w.ndim == 2 and _block_relative(arch, hf_name) in conv1d:
            w = w.T   # Conv1D stores (in, out); GGUF rows are outputs as nn.Linear's
        if arch.norm_plus_one and name.endswith("norm.weight"):
            w = w + 1.0
        yield name, w
        if kind == T.TOKEN_EMBD and hp["tied"] and hp.get("output_required"):
            yield gguf.TENSOR_NAMES[T.OUTPUT] + ".weight", w
