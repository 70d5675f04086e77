"""The `model` formula's walk over a whole model: embeddings, every block (the
pre-norm walk of engine.estimator.saved, or the post-norm encoder block here, with
DeBERTa's disentangled attention from engine.estimator.relative), the masks blocks
share, the head and the loss."""

from __future__ import annotations

from ..dims import ModelDims
from ..loss import LOSS_CHUNK
from ..methods.plan import LayerPlan, Plan
from .relative import disentangled_attention_site
from .saved import (Saved, Shape, adapter_site, attention_output_key, attention_site, dropout_mask_bytes, kv_adapters_site,
                    linear_site, llama_block, norm_out_bytes, norm_site, uses_math_kernel)


def bert_block(lp: LayerPlan, dims: ModelDims, shape: Shape, rg: bool, cfg: dict,
               rel_trains: bool = False) -> tuple[int, bool, dict]:
    """Saved bytes of one post-LayerNorm BERT block (dropout on in training); DeBERTa's
    disentangled attention (engine.estimator.relative) where the positions are relative.
    `rel_trains`: the relative position embeddings train."""
    s = Saved()
    T, a, h, i = shape.tokens, shape.a, dims.hidden_size, dims.intermediate_size
    pd = float(cfg.get("hidden_dropout_prob", cfg.get("resid_pdrop", 0.1)) or 0.0)
    ad = float(cfg.get("attention_probs_dropout_prob", cfg.get("attn_pdrop", 0.1)) or 0.0)
    arch = dims.arch
    q_p, k_p, v_p, o_p, in_p, out_p = arch.q, arch.k, arch.v, arch.o, arch.ffn_in[0], arch.ffn_out
    rg_x = rg or lp.bias
    # the block input is the residual stream (fp32 when trained embeddings feed it: under autocast
    # each projection then keeps its own 16-bit copy)
    rg_q = linear_site(lp, q_p, s, "x", T * h, h, shape, rg_x, shape.r)
    rg_k = linear_site(lp, k_p, s, "x", T * h, h, shape, rg_x, shape.r)
    rg_v = linear_site(lp, v_p, s, "x", T * h, h, shape, rg_x, shape.r)
    rg_k, rg_v = kv_adapters_site(lp, s, T * h * a, rg_k, rg_v)
    if arch.positions == "relative":
        disentangled_attention_site(lp, s, dims, shape, rg_q, rg_k, rg_v, ad, pd, rel_trains)
    else:
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


def pooled_head(tail: Saved, cfg: dict, dims: ModelDims, shape: Shape, plan: Plan) -> None:
    """A classification head on the first token (or the mean over tokens where the
    family's pooling key says "mean"): the pooler (BERT, DeBERTa; ModernBERT's dense +
    activation + norm) and the classifier. Token 0 is a view, so a training pooler keeps
    the whole last hidden state (a mean is its own vector; its product with the mask
    keeps the int64 mask); the rest is one vector per sequence."""
    B, h, a, arch = shape.batch, dims.hidden_size, shape.a, dims.arch
    mean = bool(arch.pooling_key) and cfg.get(arch.pooling_key) == "mean"
    if mean:
        tail.add("pooling.mask", shape.tokens * 8)
    if arch.pooler:
        if plan.pooler:
            tail.add("pooler.in", (B if mean else shape.tokens) * h * a)
        tail.add("pooler.act", B * h * a)
        if arch.pooler_norm:
            tail.add("pooler.norm", B * h * a + B * 8)
    pd = next((cfg[k] for k in arch.classifier_dropout_keys if cfg.get(k) is not None), 0.1)
    if float(pd or 0.0) > 0:
        tail.add("classifier.dropout_mask", B * h * dropout_mask_bytes(shape))
    tail.add("classifier.in", B * h * a)


def model_hidden_states(cfg: dict, dims: ModelDims, plan: Plan, *, batch: int, seq: int, size: int, task: str,
                        attention: str, device: str, grad_checkpointing: bool,
                        weight_casts: bool = True) -> tuple[int, dict]:
    """Bytes autograd saves during one forward of our training loop; with a
    breakdown {part: bytes}."""
    shape = Shape(batch=batch, seq=seq, prompt=plan.prompt_tokens, prefix=0, a=size, device=device,
                  attention="eager" if attention == "eager" or not dims.arch.sdpa else "sdpa",
                  resid=4 if plan.embeddings else 0,      # fp32 trained embeddings make the residual fp32
                  weight_casts=weight_casts)
    T, h, a = shape.tokens, dims.hidden_size, size
    parts: dict[str, int] = {}
    # embeddings
    rg = plan.input_grad or plan.prompt_tokens > 0
    emb = Saved()
    if plan.embeddings:
        emb.add("embed.ids", batch * seq * 8)
        rg = True
    if plan.embeddings and dims.arch.positions == "learned" and dims.arch.saved_walk == "decoder":
        emb.add("embed.position_ids", seq * 8)      # the position embedding's index (GPT-2's wpe)
    if dims.arch.embed_norm:
        rg = norm_site(emb, "embed.ln", shape, dims, rg, plan.embeddings or plan.input_grad, T) or rg
    # the embeddings' dropout (after the norm where there is one; BERT-style configs default to 0.1)
    pd = float(cfg.get(dims.arch.embed_dropout_key, 0.1 if dims.arch.embed_norm else 0.0) or 0.0)
    if rg and pd > 0 and (dims.arch.embed_norm or dims.arch.embed_dropout_key in cfg):
        emb.add("embed.dropout_mask", T * h * dropout_mask_bytes(shape))
    if dims.relative_norm and plan.embeddings:      # DeBERTa's norm of the relative embeddings: its statistics
        emb.add("rel.norm_stats", 2 * dims.relative_span * 8)
    parts["embeddings"] = emb.total
    # blocks
    dropout_p = float(cfg.get(dims.arch.attn_dropout_key, 0.0) or 0.0)
    out_p, ffn_p, ffn_out_p = (float(cfg.get(k, 0.0) or 0.0) if k else 0.0
                               for k in dims.arch.out_dropout_keys + (dims.arch.ffn_out_dropout_key,))
    flash_masks = shape.attention == "sdpa" and not uses_math_kernel(shape, dropout_p)
    per_layer = []
    # most blocks share one plan: work each distinct (plan, grad-in) out once. LayerPlans hold
    # sets and dicts (no hash; repr was a fifth of an estimate's time): compare with == against
    # the distinct ones met so far, the latest first, and remember at most 16
    seen: list = []      # (layer plan, grad-in, (bytes, grad-out)), latest last
    for i, lp in enumerate(plan.layers):
        first = i == 0 and dims.arch.first_attn_norm_identity
        for s_lp, s_rg, s_first, out in reversed(seen):
            if s_rg == rg and s_first == first and s_lp == lp:
                break
        else:
            if dims.arch.saved_walk == "decoder":
                out = llama_block(lp, dims, shape, rg, dropout_p, no_attn_norm=first, out_p=out_p, ffn_p=ffn_p,
                                  ffn_out_p=ffn_out_p)[:2]
            else:
                out = bert_block(lp, dims, shape, rg, cfg, rel_trains=plan.embeddings)[:2]
            if len(seen) < 16:
                seen.append((lp, rg, first, out))
        nbytes, rg = out
        if nbytes and i in dims.sliding_layers and flash_masks and shape.q_len >= dims.sliding_window:
            # local attention under SDPA's fused kernels: each sliding block's attention keeps its own
            # float mask (batch x seq x seq; full attention without padding needs none; the math kernel
            # adds the mask to its scores and keeps none)
            nbytes += batch * shape.q_len * shape.q_len * a
        per_layer.append(nbytes)
    if grad_checkpointing:
        # each block keeps only its input; one block is recomputed at a time in backward
        parts["layer_inputs"] = sum(T * h * a for n in per_layer if n)
        parts["recomputed_block"] = max(per_layer) if per_layer else 0
    else:
        parts["blocks"] = sum(per_layer)
    if dims.arch.rope_tables_saved and any(per_layer):
        # the unfused rotary embedding's cos and sin, one pair per layer type
        types = int(len(dims.sliding_layers) > 0) + int(len(dims.sliding_layers) < dims.num_layers)
        parts["rope_tables"] = types * 2 * shape.q_len * dims.head_dim * a
    # tail: final norm, heads, loss
    tail = Saved()
    if dims.arch.saved_walk == "decoder":
        rg_f = norm_site(tail, "final_norm", shape, dims, rg, plan.final_norm, T)
        if task == "causal_lm":
            n = batch * (seq - 1)
            fb = norm_out_bytes(shape, plan.final_norm)
            tail.add("loss.hidden", T * h * fb)                # final hidden and its shifted copy
            if batch > 1 or plan.prompt_tokens:
                tail.add("loss.shifted", n * h * fb)
            tail.add("loss.index", n * 9)                      # kept-token mask and indices
            chunk = min(n, LOSS_CHUNK)
            tail.add("loss.logits_chunk_fp32", chunk * dims.vocab_size * 4)
            if plan.lm_head and not dims.logit_transform:
                # a training LM head: the single-pass loss accumulates its fp32 weight
                # gradient during forward and keeps it for backward
                tail.add("loss.head_grad_fp32", dims.vocab_size * h * 4)
            if a != 4:
                tail.add("loss.logits_chunk", chunk * dims.vocab_size * a)
            if dims.logit_transform:
                # a soft-capped / scaled head runs through the recomputing loss: one more fp32 chunk of logits
                tail.add("loss.transformed_chunk_fp32", chunk * dims.vocab_size * 4)
        elif dims.arch.pooler:
            pooled_head(tail, cfg, dims, shape, plan)
        else:
            if plan.head or rg_f:
                tail.add("score.in", T * h * a)
    else:
        if task == "classification":
            pooled_head(tail, cfg, dims, shape, plan)
        else:
            n = batch * seq
            tail.add("mlm.transform", T * h * a * 3)
            tail.add("loss.logits_fp32", n * dims.vocab_size * 4)
    parts["head_and_loss"] = tail.total
    return sum(parts.values()), parts

