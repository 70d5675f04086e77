"""A parameter a method drops frees its id(), and Python gives that id to the next object
made: a LoRA matrix made after QLoRA quantized a weight must not be taken for that
checkpoint weight when the trainables settle as fp32 masters (it once became the
quantized-away 64x32 gate weight: 'mat1 and mat2 shapes cannot be multiplied')."""

from __future__ import annotations

import pytest

from engine.config import parse_run_config
from engine.methods.lora import LoraLinear
from engine.models import load_model
from engine.prepare import prepare_run

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-dir")
    loaded = load_model("tiny-llama", "causal_lm")
    loaded.model.save_pretrained(d, safe_serialization=True)
    loaded.tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("method", ["qlora", "lora"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_every_adapter_keeps_its_own_shape(tiny_dir, method, precision):
    cfg = parse_run_config({"model": str(tiny_dir), "task": "causal_lm", "dataset": {"name": "demo-instruct",
                            "max_rows": 8}, "method": {"name": method, "r": 4, "target_modules": ALL},
                            "training": {"precision": precision, "device": "cpu"}})
    prep = prepare_run(cfg)
    layers = [m for m in prep.model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 7 * 2
    for m in layers:
        assert tuple(m.lora_A.weight.shape) == (4, m.in_features)
        assert tuple(m.lora_B.weight.shape) == (m.out_features, 4)
        assert m.lora_B.weight.abs().sum() == 0          # still the zero init, not a checkpoint weight
