"""DeBERTa's disentangled attention in the `model` formula's walk: what transformers'
eager DisentangledSelfAttention keeps for backward, term by term (checked against
engine.measure's saved tensors on tiny models at two shapes).

Per block, with q, k, v the (batch·heads, seq, head_dim) copies of the projections:
- content scores bmm(q, kᵀ/√(d·factor)): the scaled kᵀ copy (for q's gradient) and q
  (for k's);
- the 2·span relative embeddings go through a dropout and a projection each term needs
  (pos_key_proj for c2p, pos_query_proj for p2c; query_proj / key_proj when
  share_att_key), repeated over the batch: c2p = bmm(q, pos_keyᵀ) keeps the repeated
  pos_key (for q's gradient) and q; p2c = bmm(k, pos_queryᵀ) keeps pos_query and k;
  each score tensor (batch·heads, seq, 2·span) is kept whole by the gather that picks
  the relative positions, with its int64 index (seq x seq, broadcast over batch·heads);
- the bool mask of masked_fill (batch x seq x seq, made again in each block), the
  softmax output, the dropout's mask and output, and v.
A term is kept only when the operand it differentiates requires grad."""

from __future__ import annotations

from dataclasses import replace

from ..dims import ModelDims
from ..methods.plan import LayerPlan
from .saved import Saved, Shape, dropout_mask_bytes, linear_site


def relative_projections(dims: ModelDims) -> list[tuple[str, str]]:
    """(term, block-relative linear) the relative embeddings go through. With shared
    keys transformers projects them through key_proj and query_proj whichever terms
    are on (a LoRA on query_proj keeps its input even for a c2p-only model)."""
    arch = dims.arch
    if dims.relative_shared:
        return [("c2p", arch.k), ("p2c", arch.q)]
    return list(zip(dims.relative_kinds, dims.relative_linears))


def disentangled_attention_site(lp: LayerPlan, s: Saved, dims: ModelDims, shape: Shape, rg_q: bool, rg_k: bool,
                                rg_v: bool, dropout_p: float, pos_dropout_p: float, rel_trains: bool) -> None:
    """What one block's disentangled attention saves, given which of q, k, v require
    grad, the attention and position dropouts and whether the relative embeddings
    (or their norm) train."""
    a, B, S = shape.a, shape.batch, shape.q_len
    h = dims.num_heads * dims.head_dim
    T, BH = B * S, B * dims.num_heads
    P2 = 2 * dims.relative_span
    rg_pos = {"c2p": False, "p2c": False}
    if P2:
        # the positions: dropout(relative embeddings) -> projection; without dropout or norm the
        # projection reads the embedding parameter itself (a weight, not an activation)
        # trained relative embeddings are fp32 master weights: under autocast their dropout runs in
        # fp32 and each projection keeps its own 16-bit copy of the result
        rel_bytes = 4 if rel_trains and shape.amp else a
        if rel_trains and pos_dropout_p > 0:
            s.add("rel.dropout_mask", P2 * h * (1 if shape.device == "cuda" else rel_bytes))
        rel_is_param = pos_dropout_p == 0 and not dims.relative_norm
        rel_shape = replace(shape, batch=1, seq=P2, prompt=0)
        for kind, path in relative_projections(dims):
            r = Saved()
            rg_pos[kind] = linear_site(lp, path, r, "in", P2 * h, h, rel_shape, rel_trains, rel_bytes)
            for key, n in r.parts.items():
                if not (key == "in" and rel_is_param):
                    s.add(f"rel.{key}", n)
    c2p, p2c = "c2p" in dims.relative_kinds, "p2c" in dims.relative_kinds
    if rg_k or (c2p and rg_pos["c2p"]):
        s.add("attn.q", T * h * a)
    if rg_q:
        s.add("attn.k_scaled", T * h * a)
    if p2c and rg_pos["p2c"]:
        s.add("attn.k", T * h * a)
    for kind, on, rg_content in (("c2p", c2p, rg_q), ("p2c", p2c, rg_k)):
        if not on:
            continue
        if rg_content:      # the projected positions repeated over the batch
            s.add(f"rel.{kind}_positions", B * P2 * h * a)
        if rg_content or rg_pos[kind]:
            s.add(f"rel.{kind}_scores", BH * S * P2 * a)
            s.add(f"rel.{kind}_index", S * S * 8)
    rg_scores = rg_q or rg_k or (c2p and rg_pos["c2p"]) or (p2c and rg_pos["p2c"])
    probs = BH * S * S
    if rg_scores:
        s.add("attn.mask", B * S * S)          # masked_fill's bool mask
        s.add("attn.probs", probs * a)
        if dropout_p > 0:
            s.add("attn.dropout_mask", probs * dropout_mask_bytes(shape))
        s.add("attn.v", T * h * a)
    if rg_v:
        s.add("attn.probs_dropped" if dropout_p > 0 else "attn.probs", probs * a)
