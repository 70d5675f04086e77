"""Every method trains through `peft-studio train` on both bundled models (one
short step each), and writes an adapter the engine can load back."""

import json
import math

import pytest
import yaml

from engine.methods import METHODS
from studio.cli import main

# combinations the methods refuse by design, with the error they give
REFUSED = {("llama_adapter", "minilm"): "Llama-architecture"}   # bitfit adds biases to Llama (bias-free)
MODELS = {"minilm": ("classification", "demo-sentiment"), "smollm2-135m": ("causal_lm", "demo-instruct")}


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_on_bundled_model_through_the_cli(tmp_path, capsys, model, method):
    task, dataset = MODELS[model]
    cfg = {"name": f"{method}-{model}", "model": model, "task": task,
           "dataset": {"name": dataset, "max_rows": 16},
           "method": {"name": method},
           "training": {"max_steps": 1, "batch_size": 2, "max_seq_len": 24, "eval_every": 0,
                        "eval_batches": 1, "learning_rate": 1e-3, "eval_generate": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    if (method, model) in REFUSED:
        with pytest.raises(SystemExit) as e:
            main(["train", str(tmp_path / "run.yaml"), "--out", str(out)])
        assert e.value.code == 2 and REFUSED[(method, model)] in capsys.readouterr().err
        return
    assert main(["train", str(tmp_path / "run.yaml"), "--out", str(out)]) == 0
    files = {f.name for f in out.iterdir()}
    assert {"peft_studio.json", "metrics.jsonl", "results.json"} <= files
    assert ({"adapter_config.json", "adapter_model.safetensors"} <= files) or "studio_adapter.safetensors" in files
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 1 and res["n_trainable"] > 0
    assert isinstance(res["final_loss"], float) and math.isfinite(res["final_loss"]), res["final_loss"]
