"""Loading straight to the run's dtype (engine.loading): the host memory a bf16 run's
preparation adds, measured as the rise of the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs) in a fresh subprocess.

The subprocess first prepares a tiny-llama run of the same dataset, so that imports,
the tokenized-data cache and the tokenizer code are paid before the measurement:
what is left is the model. Bounds (issue 25): a bf16 SmolLM2-135M LoRA run at most
1.3 x the bytes of its bf16 parameters; QLoRA at most its NF4 model's bytes + one
decoder layer in bf16 + 100 MB. The fp32 checkpoint (538 MB) mapped or read whole
would break both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

CHILD = textwrap.dedent("""
    import gc, json, sys
    import torch
    from engine.config import parse_run_config
    from engine.models import _tokenizer_from_dir, smollm2_dir
    from engine.prepare import prepare_run

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    method = json.loads(sys.argv[1])

    def cfg(model):
        return parse_run_config({"model": model, "task": "causal_lm",
                                 "dataset": {"name": "demo-instruct", "max_rows": 32}, "method": method,
                                 "training": {"precision": "bf16", "device": "cpu", "max_steps": 1,
                                              "eval_generate": 0}})

    _tokenizer_from_dir(smollm2_dir())          # converts the bundled GGUF once, if not cached yet
    warm = prepare_run(cfg("tiny-llama"))
    del warm
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")   # VmHWM := VmRSS
    before = status("VmRSS")
    prep = prepare_run(cfg("smollm2-135m"))
    rise = status("VmHWM") - before
    params = {id(p): p for p in prep.model.parameters()}.values()
    layer = prep.model.model.layers[0]
    print(json.dumps({
        "rise": rise,
        "model_bytes": sum(p.numel() * p.element_size() for p in params)
                       + sum(b.numel() * b.element_size() for b in prep.model.buffers()),
        "bf16_bytes": sum(p.numel() * 2 for p in params if p.is_floating_point()),
        "layer_bf16_bytes": sum(m.in_features * m.out_features * 2 for m in layer.modules()
                                if hasattr(m, "in_features") and hasattr(m, "out_features")
                                and not hasattr(m, "base_layer")),
        "dtypes": sorted({str(p.dtype) for p in params}),
    }))
""")


def measure(method: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(method)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bf16_lora_preparation_stays_within_1_3x_its_bf16_bytes():
    got = measure({"name": "lora", "r": 8})
    assert "torch.bfloat16" in got["dtypes"]
    assert got["rise"] <= 1.3 * got["bf16_bytes"], got


def test_bf16_qlora_preparation_stays_within_nf4_bytes_plus_one_layer_plus_100mb():
    got = measure({"name": "qlora", "r": 8})
    assert "torch.uint8" in got["dtypes"]
    assert got["layer_bf16_bytes"] > 5e6          # SmolLM2: 3.5 M parameters per decoder layer
    assert got["rise"] <= got["model_bytes"] + got["layer_bf16_bytes"] + 100e6, got
