"""A small byte-level BPE tokenizer for GGUF tests and the llama.cpp bench: SmolLM2's
own, kept to its first ids (a tiny model's vocabulary), with its merges and chat template,
so that a tiny random model's GGUF carries a tokenizer llama.cpp and transformers read."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 1024


def bpe_tokenizer(dest: Path, n: int = VOCAB):
    """SmolLM2's byte-level BPE kept to ids < n (the merges among them), saved in `dest`."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from engine.models import smollm2_dir

    full = AutoTokenizer.from_pretrained(smollm2_dir(), local_files_only=True)
    spec = json.loads(full.backend_tokenizer.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < n}
    pairs = [m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"]]
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in pairs if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < n]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=full.bos_token,
                                  eos_token=full.eos_token, unk_token=full.unk_token, pad_token=full.pad_token)
    tok.chat_template = full.chat_template
    tok.save_pretrained(dest)
    return AutoTokenizer.from_pretrained(dest, local_files_only=True)
