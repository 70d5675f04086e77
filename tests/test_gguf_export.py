"""GGUF export (engine.gguf_export, studio.gguf, GET /api/runs/{id}/gguf): files read
back with gguf's own reader and with transformers' GGUF loader, logits against the
merged safetensors model, the tokenizer and chat template round trip, and the route
end to end on runs trained by the real worker.

Tolerances, from the formats: f16 keeps an 11-bit significand (relative error
<= 2^-11 ~ 4.9e-4 per weight), so logits may move by a small multiple of that
relative to their scale: we allow 1e-2 of max|logit|. q8_0 rounds each weight to
one of 255 steps of its 32-value block's max|x|/127 (error <= max|x|/254 ~ 0.4% of
the block's largest weight); over embeddings and two blocks that compounds to about
1-2% of the logit scale, so we allow 5e-2 of max|logit|.

The fast model is a tiny random Llama (GQA, a 48-wide MLP so q8_0 has rows it cannot
block and writes f16) with SmolLM2's byte-level BPE cut to its first 1,024 ids: its
GGUF files load in a second, where the full 49k vocabulary costs ~15-30 s per load
(that one is covered by the slow SmolLM2 check).
"""

from __future__ import annotations

import io
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import Studio, studio_env, wait_status
from gguf_helpers import VOCAB, bpe_tokenizer  # noqa: F401  (re-exported to test_gguf_families)

from engine.arch import gguf_families

F16_TOL, Q8_TOL = 1e-2, 5e-2
SAMPLES = ["Hello world, the capital of France is Paris.", "1234 + 5678 = 6912\n\tindented",
           "naïve café — 東京 🙂", "<|im_start|>user\nhi<|im_end|>\n", "  leading spaces and trailing  "]




def tiny_llama(tok, tied: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5, rope_theta=100000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # weights of a trained model's size, not the init's near-zero ones
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def make_model_dir(d: Path, tied: bool = True) -> Path:
    tok = bpe_tokenizer(d)
    tiny_llama(tok, tied).save_pretrained(d)
    return d


def logits(model, tok) -> torch.Tensor:
    batch = tok(SAMPLES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def fields(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (type name, shape)) as gguf's reader sees them."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {k: (f.contents() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                          "tokenizer.ggml.token_type") else len(f.data))
            for k, f in r.fields.items()}
    return meta, {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape)) for t in r.tensors}


# ------------------------------------------------------------------ engine: a merged LoRA

@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A tiny Llama + BPE tokenizer, LoRA applied on every projection, its factors set to
    random values, merged and saved by the engine: (merged dir, base dir)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.adapters import merged_model_files
    from engine.methods import ApplyContext, get_method, parse_method_config
    from engine.prepare import apply_method

    base = make_model_dir(tmp_path_factory.mktemp("base"))
    tok = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    cfg = parse_method_config({"name": "lora", "r": 4, "alpha": 8, "target_modules": [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    spec = get_method(cfg.name)
    model = apply_method(model, spec, cfg, ApplyContext(task="causal_lm", seed=0))
    torch.manual_seed(1)
    with torch.no_grad():
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained
        for p in trained:
            p.copy_(torch.randn_like(p) * 0.1)
    out = merged_model_files(SimpleNamespace(spec=spec, model=model, tokenizer=tok))
    yield out, base
    import shutil
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def written(merged, tmp_path_factory):
    from engine.gguf_export import write_gguf

    d = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(merged[0], None, d / f"tiny-{q}.gguf", q, name="tiny") for q in ("f16", "q8_0")}


def test_logits_of_the_gguf_files_match_the_merged_model(merged, written):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged[0], local_files_only=True)
    ref_model = AutoModelForCausalLM.from_pretrained(merged[0], dtype=torch.float32).eval()
    ref = logits(ref_model, tok)
    # the merge is not a no-op: the adapter moved the weights the file must carry
    base_q = load_file(str(merged[1] / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert (ref_model.model.layers[0].self_attn.q_proj.weight - base_q).abs().max() > 1e-2
    base_logits = logits(AutoModelForCausalLM.from_pretrained(merged[1], dtype=torch.float32).eval(), tok)
    assert rel_diff(base_logits, ref) > 0.1
    got = {}
    for quant, tol in (("f16", F16_TOL), ("q8_0", Q8_TOL)):
        model, _ = load_gguf(written[quant])
        assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
        got[quant] = logits(model, tok)
        assert rel_diff(got[quant], ref) <= tol, (quant, rel_diff(got[quant], ref))
    # f16 is the finer format: closer to the merged model than q8_0, and q8_0 really quantized
    assert rel_diff(got["f16"], ref) < rel_diff(got["q8_0"], ref)
    assert written["q8_0"].stat().st_size < 0.75 * written["f16"].stat().st_size


def test_file_layout_names_types_and_metadata(merged, written):
    from safetensors.torch import load_file

    from engine.gguf_export import permute_rows

    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{b}.{t}.weight" for b in range(2) for t in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                          "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    meta16, t16 = fields(written["f16"])
    meta8, t8 = fields(written["q8_0"])
    assert set(t16) == set(t8) == names            # tied: no output.weight
    for n, (kind, shape) in t16.items():
        assert kind == ("F32" if len(shape) == 1 else "F16"), n
    for n, (kind, shape) in t8.items():
        want = "F32" if len(shape) == 1 else ("Q8_0" if shape[0] % 32 == 0 else "F16")
        assert kind == want, n
    assert t8["blk.0.ffn_down.weight"][0] == "F16" and t8["blk.0.attn_q.weight"][0] == "Q8_0"
    assert t8["token_embd.weight"] == ("Q8_0", (64, VOCAB))      # GGUF lists dims innermost first
    assert t16["blk.1.attn_k.weight"][1] == (64, 32)
    want = {"general.architecture": "llama", "general.name": "tiny", "llama.block_count": 2,
            "llama.context_length": 256, "llama.embedding_length": 64, "llama.feed_forward_length": 48,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
            "llama.vocab_size": VOCAB, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.tokens": VOCAB,
            "tokenizer.ggml.token_type": VOCAB, "general.file_type": 1}
    assert {k: meta16.get(k) for k in want} == want
    assert meta8["general.file_type"] == 7 and meta8["general.quantization_version"] == 2
    assert meta16["llama.rope.freq_base"] == pytest.approx(100000.0)
    assert meta16["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert 0 < meta16["tokenizer.ggml.merges"] < 1024
    # q rows are stored in llama.cpp's interleaved RoPE order, and that order differs from HF's
    from gguf import GGUFReader

    hf = load_file(str(merged[0] / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"].numpy()
    stored = {t.name: t for t in GGUFReader(written["f16"]).tensors}["blk.1.attn_q.weight"]
    data = np.asarray(stored.data, dtype=np.float32).reshape(hf.shape)
    assert np.abs(data - permute_rows(hf, 4)).max() < 1e-2
    assert np.abs(data - hf).max() > 0.1


def test_tokenizer_and_chat_template_round_trip(merged, written):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged[0], local_files_only=True)
    _, gtok = load_gguf(written["q8_0"])
    for text in SAMPLES:
        assert gtok(text)["input_ids"] == tok(text)["input_ids"], text
    assert gtok.decode(tok(SAMPLES[2])["input_ids"]) == SAMPLES[2]
    assert tok.chat_template and gtok.chat_template == tok.chat_template
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert gtok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert (gtok.bos_token, gtok.eos_token, gtok.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)


def test_untied_model_object_writes_its_output_weight(tmp_path):
    from engine.gguf_export import write_gguf

    tok = bpe_tokenizer(tmp_path / "tok")
    model = tiny_llama(tok, tied=False, seed=3)
    path = write_gguf(model, tok, tmp_path / "untied.gguf", "f16", chat_template="{{ messages[0]['content'] }}")
    _, tensors = fields(path)
    assert tensors["output.weight"] == ("F16", (64, VOCAB))
    got, gtok = load_gguf(path)
    assert not got.config.tie_word_embeddings
    assert rel_diff(logits(got, tok), logits(model, tok)) <= F16_TOL
    assert gtok.chat_template == "{{ messages[0]['content'] }}"


def test_refusals_name_the_problem_and_leave_no_file(tmp_path, merged):
    from safetensors.torch import load_file, save_file

    from engine.gguf_export import GGUFExportError, write_gguf
    from engine.models import load_model

    bert = load_model("tiny-bert", "classification")
    with pytest.raises(GGUFExportError, match="supports the decoder families llama.cpp runs; this model is bert"):
        write_gguf(bert.model, bert.tokenizer, tmp_path / "x.gguf")
    llama_wp = load_model("tiny-llama", "causal_lm")       # MiniLM's WordPiece vocabulary
    with pytest.raises(GGUFExportError, match="byte-level BPE tokenizers .*WordPiece"):
        write_gguf(llama_wp.model, llama_wp.tokenizer, tmp_path / "x.gguf")
    cls = load_model("tiny-llama", "classification")
    with pytest.raises(GGUFExportError, match="LlamaForSequenceClassification"):
        write_gguf(cls.model, cls.tokenizer, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="quant: 'q4' is not one of f16, q8_0"):
        write_gguf(merged[0], None, tmp_path / "x.gguf", "q4")
    # a tensor with no GGUF name fails mid-write: the old file stays, no temporary is left
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in merged[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    st = load_file(str(bad / "model.safetensors"))
    st["model.layers.1.extra_gate.weight"] = torch.zeros(4, 4)
    save_file(st, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous")
    with pytest.raises(GGUFExportError, match="'model.layers.1.extra_gate.weight' has no place"):
        write_gguf(bad, None, out, "q8_0")
    assert out.read_bytes() == b"previous" and sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]


# ------------------------------------------------------------------ the route, end to end

USERS = "alice:a-pass,bob:b-pass"
ALICE, BOB = ("alice", "a-pass"), ("bob", "b-pass")
RUN_NAME = "tiny gguf/../run"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A studio with login on and its embedded worker; alice's runs: a finished LoRA on
    the tiny BPE Llama (a local model directory), and a LoRA on tiny-bert."""
    tmp = tmp_path_factory.mktemp("studio")
    model_dir = make_model_dir(tmp / "data" / "local-models" / "tiny-llama-bpe")
    training = {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 32, "eval_every": 4,
                "eval_batches": 1}
    llama = {"name": RUN_NAME, "model": str(model_dir), "task": "causal_lm",
             "dataset": {"name": "demo-instruct", "max_rows": 40},
             "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"]},
             "training": {**training, "eval_generate": 0}}
    bert = {"name": "bert", "model": "tiny-bert", "task": "classification",
            "dataset": {"name": "demo-sentiment", "max_rows": 40},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}, "training": training}
    import conftest

    wait = conftest.wait_http
    with pytest.MonkeyPatch.context() as mp:   # a loaded 2-core machine can take over 90 s to serve
        mp.setattr(conftest, "wait_http", lambda url, timeout=90.0, proc=None: wait(url, max(timeout, 300.0), proc))
        s = Studio(studio_env(tmp, STUDIO_USERS=USERS), tmp)
    try:
        with client(s, ALICE) as c:
            ids = {}
            for key, cfg in (("llama", llama), ("bert", bert)):
                r = c.post("/api/runs", json=cfg)
                assert r.status_code == 201, r.text
                ids[key] = r.json()["id"]
            run = wait_status(c, ids["llama"], timeout=600)   # the BERT run is refused whatever its state
        assert run["status"] == "succeeded", s.logs()
        yield s, ids
    finally:
        s.stop()


def client(s, auth=None):
    """A client with patience for the shared, loaded machine (Studio.client waits 60 s)."""
    import httpx

    return httpx.Client(base_url=s.url, timeout=300, auth=auth)


def serve_log(s) -> str:
    return (s.tmp / f"serve-{s.port}.log").read_text()


@pytest.mark.timeout(1200)   # carries the module studio's start and training: 8 min seen at load ~30
def test_route_serves_a_gguf_that_loads_and_matches_the_merged_model(served, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.service import safe_filename

    s, ids = served
    rid = ids["llama"]
    with client(s, ALICE) as c:
        r = c.get(f"/api/runs/{rid}/gguf", params={"quant": "q8_0"}, timeout=300)
        assert r.status_code == 200, r.text + s.logs()
        assert r.headers["content-type"] == "application/octet-stream"
        name = safe_filename(f"{RUN_NAME}-q8_0.gguf")
        assert "/" not in name and name.endswith("-q8_0.gguf")
        assert f'filename="{name}"' in r.headers["content-disposition"]
        # asked again: the same bytes from the cache, built once (the log's count below), not timed
        again = c.get(f"/api/runs/{rid}/gguf", params={"quant": "q8_0"}, timeout=300)
        assert again.status_code == 200 and again.content == r.content
        m = c.get(f"/api/runs/{rid}/merged", timeout=300)
        assert m.status_code == 200
    (tmp_path / "gguf").mkdir()
    path = tmp_path / "gguf" / name
    path.write_bytes(r.content)
    zipfile.ZipFile(io.BytesIO(m.content)).extractall(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged", local_files_only=True)
    ref = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval(), tok)
    model, gtok = load_gguf(path)
    assert rel_diff(logits(model, tok), ref) <= Q8_TOL
    assert [gtok(t)["input_ids"] for t in SAMPLES] == [tok(t)["input_ids"] for t in SAMPLES]
    assert gtok.chat_template == tok.chat_template
    assert serve_log(s).count(f"run {rid}: GGUF q8_0 built") == 1


def test_concurrent_requests_build_the_file_once(served):
    s, ids = served
    rid = ids["llama"]
    answers = [None, None]

    def fetch(i):
        with client(s, ALICE) as c:
            answers[i] = c.get(f"/api/runs/{rid}/gguf", params={"quant": "f16"}, timeout=300)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(320)
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[0].content == answers[1].content and answers[0].content[:4] == b"GGUF"
    assert serve_log(s).count(f"run {rid}: GGUF f16 built") == 1


def test_route_errors_are_clear_and_login_is_enforced(served):
    s, ids = served
    with client(s, ALICE) as c:
        r = c.get(f"/api/runs/{ids['llama']}/gguf", params={"quant": "q4"})
        assert r.status_code == 422 and r.json()["detail"] == "quant: 'q4' is not one of f16, q8_0"
        r = c.get(f"/api/runs/{ids['bert']}/gguf")
        assert r.status_code == 409
        assert r.json()["detail"] == (f"GGUF export supports the decoder families llama.cpp runs "
                                      f"({', '.join(gguf_families())}); run {ids['bert']} is bert")
        assert c.get("/api/runs/999999/gguf").status_code == 404
        assert "/runs/{run_id}/gguf" in c.get("/api/openapi.json").json()["paths"]
    with client(s) as anon:
        assert anon.get(f"/api/runs/{ids['llama']}/gguf").status_code == 401
    with client(s, BOB) as other:    # not alice's: as if it did not exist
        assert other.get(f"/api/runs/{ids['llama']}/gguf").status_code == 404


# ------------------------------------------------------------------ the real model

@pytest.mark.slow
@pytest.mark.timeout(1800)   # ~1-2 min on an idle 2-core machine; 10+ under the shared load seen here
def test_smollm2_lora_as_q8_0_answers_like_the_merged_model(tmp_path):
    """A few LoRA steps on SmolLM2-135M, merged, exported q8_0 (its full 49k BPE
    vocabulary and chat template): the GGUF-loaded model's greedy answer to a chat
    prompt is the merged model's, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.adapters import merged_model_files
    from engine.config import parse_run_config
    from engine.gguf_export import write_gguf
    from engine.prepare import prepare_run
    from engine.train import train

    cfg = parse_run_config({
        "name": "smollm2-gguf", "model": "smollm2-135m", "task": "causal_lm",
        "dataset": {"name": "demo-instruct", "max_rows": 64},
        "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "training": {"max_steps": 3, "batch_size": 2, "learning_rate": 3e-3, "max_seq_len": 48, "eval_every": 0,
                     "eval_generate": 0, "eval_batches": 1, "eval_max_rows": 8}})
    prep = prepare_run(cfg)
    train(prep)
    merged = merged_model_files(prep)
    try:
        tok = AutoTokenizer.from_pretrained(merged, local_files_only=True)
        ref_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        path = write_gguf(merged, None, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    finally:
        import shutil
        shutil.rmtree(merged, ignore_errors=True)
    model, gtok = load_gguf(path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert gtok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == prompt
    ids = tok(prompt, return_tensors="pt")
    assert gtok(prompt)["input_ids"] == ids["input_ids"][0].tolist()
    for text in SAMPLES:
        assert gtok(text)["input_ids"] == tok(text)["input_ids"], text

    def answer(m):
        with torch.no_grad():
            out = m.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        return out[0, ids["input_ids"].shape[1]:].tolist()

    want = answer(ref_model)
    assert answer(model) == want, (tok.decode(answer(model)), tok.decode(want))
    assert "Paris" in tok.decode(want)
    # 30 blocks compound q8_0's rounding more than the tiny model's 2 (measured 0.041 here)
    assert rel_diff(logits(model, tok), logits(ref_model, tok)) <= 2 * Q8_TOL


def test_deleting_a_run_removes_its_gguf_files(settings):
    """The GGUF files kept in the data dir go with their run; another run's stay."""
    from studio import gguf, service
    from workers import db

    ids = []
    with db.transaction(settings.database_url) as s:
        for name in ("a", "b"):
            run = db.Run(name=name, status="succeeded", config={}, model="tiny-llama", method="lora", task="causal_lm")
            s.add(run)
            s.flush()
            ids.append(run.id)
    folder = gguf.gguf_dir(settings)
    folder.mkdir(parents=True)
    for rid in ids:
        for quant in gguf.QUANTS:
            (folder / f"run{rid}-0123456789abcdef-{quant}.gguf").write_bytes(b"GGUF")
    service.delete_run(settings, ids[0])
    assert gguf.cached(settings, ids[0]) == []
    assert len(gguf.cached(settings, ids[1])) == len(gguf.QUANTS)
