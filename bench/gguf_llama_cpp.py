"""Real llama.cpp as the oracle of the GGUF export: for every family engine.gguf_export
writes, a tiny random model (engine.models.tiny_config: 2 blocks, hidden 32, with
weights of a trained model's size) is written f16 with the project's venv, its
transformers logits of a fixed prompt saved, and llama.cpp (llama-cpp-python, which
vendors it, in a separate venv: it takes >10 min to build, so it is no test
dependency) evaluates the same token ids from the file. Writes bench/RESULTS-gguf.md.

    python bench/gguf_llama_cpp.py [--llama-python /tmp/lcpvenv/bin/python] [--families llama,qwen2]

The tokenizer is SmolLM2's byte-level BPE cut to its first 1,024 ids (as
tests/test_gguf_export.py builds it); llama.cpp is given token ids, so only its loading
of the vocabulary is exercised, not its tokenization.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gguf_helpers import bpe_tokenizer  # noqa: E402  (the tests' tokenizer: one definition)
from stamp import Stamp  # noqa: E402

VOCAB = 1024
PROMPT = "Hello world, the capital of France is Paris. 1234 + 5678 = 6912\n\tnaïve café — 東京 🙂"
# settings the tiny configs need for llama.cpp to compute what transformers does (see
# engine/gguf_archs.py: llama.cpp scales Gemma's queries by 1/sqrt(head_dim), always
# renormalises Qwen3-MoE's top-k weights); Granite's multipliers made visible
# Some use more blocks or a short window so that what differs between layers is exercised:
# SmolLM3's 4th block has no RoPE, Gemma 3's 6th is its full-attention one (RoPE base
# 1e6, the sliding ones 1e4), a 16-token window is shorter than the prompt.
_SWA = ["sliding_attention"] * 5 + ["full_attention"]
OVER = {"gemma2": {"query_pre_attn_scalar": 8, "sliding_window": 16},
        "gemma3_text": {"query_pre_attn_scalar": 8, "sliding_window": 16, "num_hidden_layers": 6, "layer_types": _SWA},
        "smollm3": {"num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0]},
        "qwen3_moe": {"norm_topk_prob": True},
        "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                    "logits_scaling": 8.0}}

LLAMA_CPP = r"""
import json, sys
import numpy as np
from llama_cpp import Llama, __version__
jobs = json.load(open(sys.argv[1]))
out = {"version": __version__, "results": {}}
for fam, job in jobs.items():
    try:
        llm = Llama(model_path=job["gguf"], logits_all=True, n_ctx=128, n_threads=2, n_batch=128, verbose=False)
        ids = job["ids"]
        llm.eval(ids)
        got = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
        want = np.load(job["logits"])
        out["results"][fam] = {"max_abs": float(np.abs(got - want).max()), "scale": float(np.abs(want).max()),
                               "argmax_agree": float((got.argmax(-1) == want.argmax(-1)).mean())}
        if job.get("text") is not None:   # llama.cpp's own tokenization of the text, against transformers'
            out["results"][fam]["same_tokens"] = llm.tokenize(job["text"].encode(), add_bos=False,
                                                              special=False) == ids
    except Exception as e:
        out["results"][fam] = {"error": f"{type(e).__name__}: {e}"[:300]}
print(json.dumps(out))
"""


def write_family(family: str, tok, d: Path, ids: list[int]) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from engine.arch import arch_for_model_type
    from engine.gguf_export import write_gguf
    from engine.models import tiny_config

    ids_ = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gpt2":   # no tiny config in engine.arch: built alike
        from transformers import GPT2Config

        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **ids_)
    else:
        cfg = tiny_config(family, VOCAB, **ids_, **OVER.get(family, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    path = write_gguf(model, tok, d / f"{family}.gguf", "f16", name=f"tiny-{family}")
    np.save(d / f"{family}.npy", logits)
    return {"gguf": str(path), "logits": str(d / f"{family}.npy"), "ids": ids,
            "arch": arch_for_model_type(family).gguf_arch, "blocks": cfg.num_hidden_layers}


def write_smollm2(d: Path) -> dict:
    """The bundled SmolLM2-135M (its full 49k vocabulary) written f16, with its logits of
    PROMPT as tokenized by transformers."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.gguf_export import write_gguf
    from engine.models import smollm2_dir

    tok = AutoTokenizer.from_pretrained(smollm2_dir(), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    ids = tok.encode(PROMPT, add_special_tokens=False)
    with torch.no_grad():
        np.save(d / "smollm2.npy", model(torch.tensor([ids])).logits[0].float().numpy())
    path = write_gguf(model, tok, d / "smollm2.gguf", "f16", name="SmolLM2-135M")
    return {"gguf": str(path), "logits": str(d / "smollm2.npy"), "ids": ids, "text": PROMPT, "arch": "llama",
            "blocks": model.config.num_hidden_layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-python", default="/tmp/lcpvenv/bin/python")
    ap.add_argument("--families", default="")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the bundled SmolLM2-135M row")
    ap.add_argument("--no-write", action="store_true", help="print only, leave bench/RESULTS-gguf.md")
    args = ap.parse_args()
    from engine.arch import gguf_families

    st = Stamp("bench/gguf_llama_cpp.py")
    families = [f for f in args.families.split(",") if f] or gguf_families()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tok = bpe_tokenizer(d / "tok")
        ids = [tok.bos_token_id] + tok.encode(PROMPT, add_special_tokens=False)
        jobs = {f: write_family(f, tok, d, ids) for f in families}
        if not args.no_smollm2:
            jobs["smollm2-135m (bundled, real weights)"] = write_smollm2(d)
        (d / "jobs.json").write_text(json.dumps(jobs))
        (d / "run.py").write_text(LLAMA_CPP)
        r = subprocess.run([args.llama_python, str(d / "run.py"), str(d / "jobs.json")], capture_output=True,
                           text=True, timeout=1800)
        if r.returncode:
            sys.exit(f"llama.cpp run failed:\n{r.stderr[-3000:]}")
        out = json.loads(r.stdout.strip().splitlines()[-1])
    st.say(f"Each family's tiny random model (2 blocks unless said, hidden 32, 4 heads (2 KV heads) of 8, vocabulary "
           f"{VOCAB}) written f16 by engine.gguf_export and evaluated by llama.cpp (llama-cpp-python "
           f"{out['version']}, CPU) on the same {len(ids)} token ids as transformers (fp32). max |diff|: over "
           f"every position and vocabulary entry; rel: that over max |logit|; argmax: share of positions "
           f"whose top token agrees. f16 weights round each weight by up to 2^-11 of itself; "
           f"tests/test_gguf_export.py allows transformers' reading of the same files 1e-2 of max |logit|. "
           f"Mistral's tiny config builds the very weights Llama's does (same seed, same shapes), "
           f"hence the same row. Gemma 2 / 3 use a 16-token window (the prompt is longer): "
           f"writing the window doubled moved rel to ~1 when tried, so the window is exercised. The last "
           f"row is the bundled SmolLM2-135M with its full vocabulary: there llama.cpp also tokenizes "
           f"the prompt itself, and 'same tokens' says whether it gets transformers' ids.")
    st.say("")
    st.say("| family | llama.cpp arch | blocks | max abs diff | max abs logit | rel | argmax agree | same tokens |")
    st.say("|---|---|---|---|---|---|---|---|")
    for f in jobs:
        res = out["results"][f]
        if "error" in res:
            st.say(f"| {f} | {jobs[f]['arch']} | {jobs[f]['blocks']} | failed: {res['error']} | | | | |")
            continue
        same = {True: "yes", False: "no", None: ""}[res.get("same_tokens")]
        st.say(f"| {f} | {jobs[f]['arch']} | {jobs[f]['blocks']} | {res['max_abs']:.2e} | {res['scale']:.3f} | "
               f"{res['max_abs'] / res['scale']:.2e} | {res['argmax_agree']:.2f} | {same} |")
    if not args.no_write:
        st.write("gguf", title="GGUF export against llama.cpp")


if __name__ == "__main__":
    main()
