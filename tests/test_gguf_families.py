"""GGUF export of every decoder family engine.arch writes (engine.gguf_archs).

- Families transformers' GGUF loader reads (llama, mistral, qwen2, qwen3, qwen3_moe,
  phi3, gemma2, gemma3, gpt2): a tiny random model is written f16, loaded back with
  `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and its logits compared
  with the source model's (f16 tolerance, as tests/test_gguf_export.py argues: 1e-2 of
  max|logit|). The loader fills what the file does not say from the config class's
  defaults, so those tiny models use the defaults where the loader reads no key: head_dim
  128 (Qwen3, Qwen3-MoE) and 256 (Gemma), moe_intermediate_size 768.
- Families it cannot read (olmo2, granite, smollm3, mixtral written as llama with
  experts): gguf's own reader must see exactly the tensors llama.cpp creates for that
  architecture (names and shapes as src/llama-model.cpp creates them, written out here
  by hand), the metadata keys llama.cpp requires, and tensors that, with the transforms
  inverted (q/k row order, expert split), are the source weights.
- Refusals: what llama.cpp would compute differently is refused, naming the config field.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from test_gguf_export import F16_TOL, VOCAB, bpe_tokenizer, rel_diff

H, HEADS, KV, HD, FFN, BLOCKS = 32, 4, 2, 8, 64, 2
READABLE = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"head_dim": 128},
            "qwen3_moe": {"head_dim": 128, "moe_intermediate_size": 768, "norm_topk_prob": True},
            "phi3": {}, "gemma2": {"head_dim": 256}, "gemma3_text": {"head_dim": 256}, "gpt2": {}}
GRANITE = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
           "logits_scaling": 8.0}
UNREADABLE = {"olmo2": {}, "granite": GRANITE, "smollm3": {}, "mixtral": {}}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny(family: str, tok, **over):
    """A tiny random model of `family` (engine.models.tiny_config: 2 blocks, hidden 32;
    GPT-2 built alike from its own config with n_positions 1024 and the default FFN width,
    which is what transformers' GGUF loader assumes) with weights of a trained model's size."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from engine.models import tiny_config

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gpt2":   # n_positions stays 1024: transformers' loader reads n_ctx, not n_positions
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=BLOCKS, n_head=HEADS, **ids, **over)
    else:
        cfg = tiny_config(family, VOCAB, **ids, **over)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def prompt(tok) -> torch.Tensor:
    return torch.tensor([[tok.bos_token_id] + tok.encode("Hello world, the capital of France is Paris. 1234",
                                                         add_special_tokens=False)])


@pytest.mark.parametrize("family", sorted(READABLE))
def test_transformers_reads_each_family_back_with_the_same_logits(family, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.gguf_export import write_gguf

    model = tiny(family, tok, **READABLE[family])
    path = write_gguf(model, tok, tmp_path / f"{family}.gguf", "f16", name=f"tiny-{family}")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = prompt(tok)
    with torch.no_grad():
        want, got = model(ids).logits, back(ids).logits
    assert rel_diff(got, want) < F16_TOL, family


def test_q8_0_writes_the_3d_expert_tensors_blockwise(tok, tmp_path):
    """Qwen3-MoE in q8_0: the experts' 3-D tensors are quantized too, each weight within
    half a step (max|x|/254 of its 32-value block, bounded here by the tensor's max) of
    the source. (Logits are not compared: q8_0's rounding may flip a near-tied top-k
    routing choice, which moves a token's output by a whole expert.)"""
    from gguf import GGUFReader, dequantize

    from engine.gguf_export import write_gguf

    model = tiny("qwen3_moe", tok, **READABLE["qwen3_moe"])
    path = write_gguf(model, tok, tmp_path / "m.gguf", "q8_0", name="tiny-qwen3moe")
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    src = model.model.layers[1].mlp.experts
    gate_up, down = src.gate_up_proj.detach().numpy(), src.down_proj.detach().numpy()
    half = gate_up.shape[1] // 2
    for name, want in (("ffn_gate_exps", gate_up[:, :half]), ("ffn_up_exps", gate_up[:, half:]),
                       ("ffn_down_exps", down)):
        t = tensors[f"blk.1.{name}.weight"]
        assert t.tensor_type.name == "Q8_0", name
        got = dequantize(t.data, t.tensor_type).reshape(want.shape)
        assert np.abs(got - want).max() <= np.abs(want).max() / 254 * 1.01, name


# ------------------------------------------------------------------ families transformers cannot read

def _llama_block(ffn: bool = True) -> dict:
    """llama.cpp's per-block tensors of a Llama block, ne order (innermost first)."""
    out = {"attn_norm": (H,), "attn_q": (H, HEADS * HD), "attn_k": (H, KV * HD), "attn_v": (H, KV * HD),
           "attn_output": (HEADS * HD, H), "ffn_norm": (H,)}
    if ffn:
        out.update({"ffn_gate": (H, FFN), "ffn_up": (H, FFN), "ffn_down": (FFN, H)})
    return out


E = 4
EXPECTED = {   # family -> (gguf arch, block tensors and shapes, HF block-relative name of each)
    "granite": ("granite", _llama_block()),
    "smollm3": ("smollm3", _llama_block()),
    "mixtral": ("llama", {**_llama_block(ffn=False), "ffn_gate_inp": (H, E), "ffn_gate_exps": (H, FFN, E),
                          "ffn_up_exps": (H, FFN, E), "ffn_down_exps": (FFN, H, E)}),
    "olmo2": ("olmo2", {"attn_q": (H, HEADS * HD), "attn_k": (H, KV * HD), "attn_v": (H, KV * HD),
                        "attn_output": (HEADS * HD, H), "attn_q_norm": (HEADS * HD,), "attn_k_norm": (KV * HD,),
                        "post_attention_norm": (H,), "ffn_gate": (H, FFN), "ffn_up": (H, FFN),
                        "ffn_down": (FFN, H), "post_ffw_norm": (H,)}),
}
HF_NAME = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
           "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
           "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
           "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
           "ffn_gate_inp": "mlp.gate", "ffn_down_exps": "mlp.experts.down_proj"}
# keys llama.cpp's loader requires (get_key without `false`) or the graph reads
REQUIRED = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
            "attention.layer_norm_rms_epsilon")
EXTRA = {"granite": {"embedding_scale": 12.0, "residual_scale": 0.22, "attention.scale": 0.0078125,
                     "logit_scale": 8.0},
         "mixtral": {"expert_count": E, "expert_used_count": 2}}
OUTPUT_REQUIRED = {"olmo2"}   # llama.cpp's olmo2 creates output.weight as required
PAIRWISE_ROPE = {"granite", "smollm3", "mixtral"}   # llama.cpp's "normal" RoPE: q/k rows reordered


def _rows_back(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's pairwise q/k row order back to Hugging Face's rotate-half one
    (per head, rows (d/2, 2) -> (2, d/2))."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("family", sorted(UNREADABLE))
def test_files_transformers_cannot_read_hold_what_llama_cpp_loads(family, tok, tmp_path):
    from gguf import GGUFReader

    from engine.gguf_export import write_gguf

    model = tiny(family, tok, **UNREADABLE[family])
    arch, block = EXPECTED[family]
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f16", name=f"tiny-{family}")
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert meta["general.architecture"] == arch
    for key in REQUIRED:
        assert f"{arch}.{key}" in meta, key
    want_meta = {"block_count": BLOCKS, "embedding_length": H, "feed_forward_length": FFN,
                 "attention.head_count": HEADS, "attention.head_count_kv": KV, "rope.dimension_count": HD,
                 **EXTRA.get(family, {})}
    for key, v in want_meta.items():
        assert meta[f"{arch}.{key}"] == pytest.approx(v), key

    # exactly llama.cpp's tensors (tied: no output.weight unless llama.cpp requires it), in its shapes
    want = {"token_embd.weight": (H, VOCAB), "output_norm.weight": (H,)}
    if family in OUTPUT_REQUIRED:
        want["output.weight"] = (H, VOCAB)
    want |= {f"blk.{b}.{n}.weight": s for b in range(BLOCKS) for n, s in block.items()}
    got = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert got == want

    # and the source weights, the transforms undone
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    data = {t.name: np.asarray(t.data, dtype=np.float32).reshape(tuple(reversed(got[t.name]))) for t in r.tensors}
    seen = {"model.embed_tokens.weight": data["token_embd.weight"], "model.norm.weight": data["output_norm.weight"]}
    for b in range(BLOCKS):
        for n in block:
            w = data[f"blk.{b}.{n}.weight"]
            if family in PAIRWISE_ROPE and n in ("attn_q", "attn_k"):
                w = _rows_back(w, HEADS if n == "attn_q" else KV)
            if n in ("ffn_gate_exps", "ffn_up_exps"):
                if n == "ffn_up_exps":
                    continue
                w = np.concatenate([w, data[f"blk.{b}.ffn_up_exps.weight"]], axis=1)
                seen[f"model.layers.{b}.mlp.experts.gate_up_proj"] = w
                continue
            hf = f"model.layers.{b}.{HF_NAME[n]}" + ("" if n.endswith("_exps") else ".weight")
            seen[hf] = w
    if family in OUTPUT_REQUIRED:
        seen["lm_head.weight"] = data["output.weight"]
    expected = {k: v for k, v in sd.items() if k != "lm_head.weight" or family in OUTPUT_REQUIRED}
    assert set(seen) == set(expected)
    for k, w in seen.items():
        np.testing.assert_allclose(w, expected[k], rtol=2e-3, atol=1e-4, err_msg=k)


# ------------------------------------------------------------------ refusals

REFUSED = [
    ("gemma2", {"query_pre_attn_scalar": 64}, "gemma2: query_pre_attn_scalar is 64, but llama.cpp scales queries "
                                              "by 1/sqrt\\(8\\)"),
    ("gemma2", {"query_pre_attn_scalar": 8, "final_logit_softcapping": None},
     "gemma2: final_logit_softcapping is off, but llama.cpp's gemma2 always soft-caps"),
    ("gemma2", {"query_pre_attn_scalar": 8, "layer_types": ["full_attention", "sliding_attention"]},
     "layer_types .* differ from llama.cpp's fixed pattern"),
    ("gemma3_text", {"query_pre_attn_scalar": 8, "final_logit_softcapping": 30.0},
     "gemma3_text: final_logit_softcapping is 30.0, but llama.cpp's gemma3 does not soft-cap"),
    ("qwen3_moe", {}, "qwen3_moe: norm_topk_prob is false"),
    ("smollm3", {"no_rope_layers": [1, 0]}, "smollm3: no_rope_layers \\[1, 0\\] differ"),
    ("qwen2", {"use_sliding_window": True}, "qwen2: use_sliding_window is set"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "llama: RoPE scaling 'linear' is not supported"),
    ("phi3", {"hidden_act": "gelu"}, "phi3: hidden_act 'gelu' is not the silu"),
    ("olmo2", {"head_dim": 16}, "olmo2: head_dim 16 x 4 heads is not hidden_size 32"),
    ("gemma2", {"query_pre_attn_scalar": 8, "tie_word_embeddings": False},
     "gemma2: tie_word_embeddings is false, but llama.cpp's gemma2 always uses the embeddings"),
]


@pytest.mark.parametrize("family,over,match", REFUSED, ids=[f"{f}-{next(iter(o), 'default')}" for f, o, _ in REFUSED])
def test_what_llama_cpp_would_compute_differently_is_refused_naming_the_field(family, over, match):
    from engine.gguf_archs import GGUFExportError, gguf_hparams
    from engine.models import tiny_config

    cfg = tiny_config(family, VOCAB, **over).to_dict()
    with pytest.raises(GGUFExportError, match=match):
        gguf_hparams(cfg)


def test_encoders_are_refused_naming_the_families_written():
    from engine.arch import ARCHS
    from engine.gguf_archs import GGUFExportError, gguf_hparams

    written = [a.family for a in ARCHS if a.gguf_arch]
    assert written == ["llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "olmo2", "gemma2",
                       "gemma3_text", "phi3", "mixtral", "qwen3_moe", "gpt2"]
    for kind in ("bert", "modernbert", "t5"):
        with pytest.raises(GGUFExportError, match=f"this model is {kind} \\(this exporter writes "
                                                  f"{', '.join(written)}\\)"):
            gguf_hparams({"model_type": kind})


def test_a_tensor_with_no_place_in_the_architecture_is_refused(tok, tmp_path):
    from engine.gguf_export import GGUFExportError, write_gguf

    model = tiny("olmo2", tok)
    model.model.layers[0].register_buffer("extra_scale", torch.ones(H))
    with pytest.raises(GGUFExportError, match="'model.layers.0.extra_scale' has no place in a olmo2 GGUF file"):
        write_gguf(model, tok, tmp_path / "m.gguf")
    assert list(Path(tmp_path).iterdir()) == []


def test_a_name_llama_cpp_reads_as_phi3_is_respelled_unless_the_vocabulary_has_its_tokens():
    """llama.cpp's vocabulary loader looks up Phi-3's SentencePiece tokens whenever
    general.name contains "phi3" / "phi-3", and fails to load a file without them (seen
    with bench/gguf_llama_cpp.py): the name is respelled then, kept otherwise."""
    from engine.gguf_export import llama_cpp_safe_name

    assert llama_cpp_safe_name("my Phi-3 run", ["a", "b"]) == "my Phi 3 run"
    assert llama_cpp_safe_name("tiny-phi3", ["a"]) == "tiny-phi 3"
    assert llama_cpp_safe_name("tiny-phi3", ["</s>", "<unk>", "<s>", "<|endoftext|>"]) == "tiny-phi3"
    assert llama_cpp_safe_name("qwen3 run", ["a"]) == "qwen3 run"
