"""GGUF export of a (merged) decoder causal LM, for llama.cpp, Ollama and LM Studio.

`write_gguf(model, tokenizer, out_path, quant)` writes one GGUF v3 file with the
`gguf` package (the writer llama.cpp's own converter uses): the hyperparameters of the
llama.cpp architecture the family is written as (`Arch.gguf_arch`; engine.gguf_archs
holds each architecture's keys and tensor transforms), every weight under its GGUF
tensor name (gguf's tensor name map), a byte-level BPE ("gpt2") tokenizer with its
merges, special ids and chat template.

Facts this follows (the format is specified in ggml's docs/gguf.md; llama.cpp's
convert_hf_to_gguf.py is the reference converter):
- Per-architecture transforms (q/k row order for llama.cpp's pairwise RoPE, Gemma's
  norm +1, expert stacking) are engine.gguf_archs's; transformers' GGUF loader
  (modeling_gguf_pytorch_utils) undoes the same ones.
- A model whose lm_head is tied to the embeddings has no `output.weight`; loaders
  (llama.cpp, transformers) then use `token_embd.weight` for the output.
- Norms and biases stay F32. f16 stores 2-D and 3-D weights as IEEE half (11-bit
  significand: relative error <= 2^-11 per weight). q8_0 stores blocks of 32 values
  as int8 with one f16 scale max|x|/127 (error <= max|x|/254 per block); it needs
  rows whose length is a multiple of 32, others are written f16.
- The file is written to a temporary name beside `out_path` and renamed into
  place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .gguf_archs import GGUFExportError, gguf_hparams, gguf_tensors, permute_rows, write_hparams

__all__ = ["GGUFExportError", "QUANTS", "encode", "gguf_hparams", "permute_rows", "tokenizer_metadata", "write_gguf"]

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0")
Q8_BLOCK = 32
# Hugging Face pre-tokenizers with a llama.cpp equivalent (tokenizer.ggml.pre)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ------------------------------------------------------------------ source: a directory or a model

def _source(model) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(config.json as a dict, (name, tensor) pairs) of a model directory (safetensors
    only) or an in-memory transformers model."""
    if isinstance(model, (str, os.PathLike)):
        d = Path(model)
        if not (d / "config.json").is_file():
            raise GGUFExportError(f"{d}: no config.json (not a Hugging Face model directory)")
        files = sorted(d.glob("*.safetensors"))
        if not files:
            raise GGUFExportError(f"{d}: no .safetensors weights")
        cfg = json.loads((d / "config.json").read_text())

        def tensors():
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    for k in st.keys():
                        yield k, st.get_tensor(k)
        return cfg, tensors()
    cfg = model.config.to_dict()
    if not cfg.get("architectures"):
        cfg["architectures"] = [type(model).__name__]
    return cfg, iter(model.state_dict().items())


# ------------------------------------------------------------------ tensors

def encode(w: np.ndarray, quant: str):
    """(array, raw GGML type or None) for the writer: 1-D stays F32; 2-D is F16, or Q8_0
    when `quant` is q8_0 and the rows hold whole 32-value blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim < 2:
        return w, None
    if quant == "q8_0" and w.shape[-1] % Q8_BLOCK == 0:
        return quantize(w, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return w.astype(np.float16), None


# ------------------------------------------------------------------ tokenizer

def _pre_tokenizer_name(pre: Optional[dict]) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level BPE pre-tokenizer."""
    def byte_level(p, regex):
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex

    if pre and byte_level(pre, True):
        return "gpt-2"   # llama.cpp's name (llama-vocab.cpp); "gpt2" is refused there as unknown
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        first, second = steps
        if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
            return "smollm"   # digits one by one, then GPT-2's regex (llama.cpp's SmolLM/StarCoder split)
        if first.get("type") == "Split" and (first.get("pattern") or {}).get("Regex") == LLAMA3_SPLIT \
                and byte_level(second, False):
            return "llama-bpe"
    raise GGUFExportError(f"GGUF export: the tokenizer's pre-tokenizer has no llama.cpp equivalent "
                          f"({json.dumps(pre)[:200]})")


def _special_flags(tok) -> tuple[bool, bool]:
    """(adds BOS, adds EOS) when encoding with special tokens, as the tokenizer does."""
    with_sp = tok.encode("a")
    plain = tok.encode("a", add_special_tokens=False)
    extra = len(with_sp) - len(plain)
    bos = extra > 0 and tok.bos_token_id is not None and with_sp[0] == tok.bos_token_id
    eos = extra > 0 and tok.eos_token_id is not None and with_sp[-1] == tok.eos_token_id
    return bos, eos


def tokenizer_metadata(tok, vocab_size: int) -> dict:
    """The tokenizer.ggml.* fields of a byte-level BPE tokenizer, padded to the model's
    vocabulary (ids no token has become "[PAD<id>]", type UNUSED, as llama.cpp does)."""
    from gguf import TokenType

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tok).__name__}")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        kind = model.get("type") or "unknown"
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            kind = "SentencePiece-style BPE"
        raise GGUFExportError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 style); this tokenizer is "
                              f"{kind}")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())} but the model's "
                              f"vocabulary holds {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TokenType.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, int(TokenType.NORMAL)
    for i, added in getattr(tok, "added_tokens_decoder", {}).items():
        if i < vocab_size:
            types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    add_bos, add_eos = _special_flags(tok)
    ids = {k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    return {"model": "gpt2", "pre": _pre_tokenizer_name(spec.get("pre_tokenizer")), "tokens": tokens,
            "token_types": types, "merges": merges, "ids": {k: v for k, v in ids.items() if v is not None},
            "add_bos": add_bos, "add_eos": add_eos, "chat_template": getattr(tok, "chat_template", None)}


# ------------------------------------------------------------------ the file

# llama.cpp's vocabulary loader (llama-vocab.cpp) looks these tokens up, and fails to load
# the file when one is missing, whenever general.name contains "phi-3" or "phi3" (Phi-3's
# SentencePiece vocabulary); the name is informational, so it is spelled so as not to match
_PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def llama_cpp_safe_name(name: str, tokens: list[str]) -> str:
    """`name` for general.name, "phi-3"/"phi3" written "phi 3" unless the vocabulary has
    the tokens llama.cpp then looks up."""
    if _PHI3_NAME.search(name) and not set(_PHI3_TOKENS) <= set(tokens):
        return _PHI3_NAME.sub(lambda m: m.group(0)[:3] + " 3", name)
    return name


def write_gguf(model, tokenizer, out_path: str | os.PathLike, quant: str = "f16",
               chat_template: Optional[str] = None, name: Optional[str] = None) -> Path:
    """Write `model` (a model directory holding config.json + safetensors, or a
    transformers causal LM of a family engine.arch writes) and `tokenizer` (None: the directory's own) as a
    GGUF file at `out_path`, its 2-D weights in `quant` (f16 or q8_0). The chat
    template is `chat_template`, else the tokenizer's. Returns the path."""
    import gguf

    if quant not in QUANTS:
        raise GGUFExportError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    cfg, tensors = _source(model)
    hp = gguf_hparams(cfg)
    if tokenizer is None:
        if not isinstance(model, (str, os.PathLike)):
            raise GGUFExportError("GGUF export needs the model's tokenizer")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    tk = tokenizer_metadata(tokenizer, hp["vocab_size"])
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    w = gguf.GGUFWriter(tmp, hp["gguf_arch"])
    try:
        w.add_name(llama_cpp_safe_name(name or str(cfg.get("_name_or_path") or "model"), tk["tokens"]))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        if quant == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, hp)
        w.add_tokenizer_model(tk["model"])
        w.add_tokenizer_pre(tk["pre"])
        w.add_token_list(tk["tokens"])
        w.add_token_types(tk["token_types"])
        w.add_token_merges(tk["merges"])
        for k, v in tk["ids"].items():
            getattr(w, f"add_{k}_token_id")(int(v))
        w.add_add_bos_token(tk["add_bos"])
        w.add_add_eos_token(tk["add_eos"])
        template = chat_template or tk["chat_template"]
        if template:
            w.add_chat_template(template)
        seen = set()
        for gname, arr in gguf_tensors(hp, tensors):
            data, raw = encode(arr, quant)
            w.add_tensor(gname, data, raw_dtype=raw)
            seen.add(gname)
        missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in seen]
        if not hp["tied"] and "output.weight" not in seen:
            missing.append("output.weight")
        if missing:
            raise GGUFExportError(f"GGUF export: the model has no {', '.join(missing)}")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)   # mkstemp made it private; a model file is not
        os.replace(tmp, out)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.info("wrote %s (%s, %d bytes)", out, quant, out.stat().st_size)
    return out
