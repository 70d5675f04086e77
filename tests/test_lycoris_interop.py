"""LoHa, LoKr, VeRA and OFT (issue 16): trained through `peft-studio train` on the tiny
Llama, the saved adapter loads in the real `peft` with our logits within 1e-5; peft's
own adapters import into the engine; counts from the config equal peft's; bad configs
are refused naming the field. peft is the reference here only (tests/ and bench/)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import require  # noqa: E402

peft = require("peft")   # the test extra: missing, these tests fail (never skip)

from engine.adapters import PEFT_CONFIG, load_base, load_peft_adapter_into, load_trained
from engine.config import parse_run_config
from engine.dims import dims_of_model
from engine.methods import get_method, parse_method_config
from engine.models import load_model

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5

# method config trained by the CLI (small, not the defaults, to cover the options)
TRAINED = {
    "loha": {"name": "loha", "r": 4, "alpha": 6, "target_modules": ["q_proj", "v_proj", "down_proj"],
             "rank_pattern": {"down_proj": 2}},
    "lokr": {"name": "lokr", "r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj", "up_proj"],
             "decompose_both": True, "init_weights": False},
    "vera": {"name": "vera", "r": 16, "target_modules": ["q_proj", "v_proj", "gate_proj"], "projection_prng_key": 7},
    # 12 divides neither 32 nor 64: both sides move it to 8 (nearest divisor, ties down)
    "oft": {"name": "oft", "oft_block_size": 12, "target_modules": ["q_proj", "v_proj", "down_proj"]},
}
PEFT_TYPES = {"loha": "LOHA", "lokr": "LOKR", "vera": "VERA", "oft": "OFT"}


def run_config(method: dict) -> dict:
    return {"name": f"interop-{method['name']}", "model": "tiny-llama", "task": "causal_lm",
            "dataset": {"name": "demo-instruct", "max_rows": 16},
            "method": method,
            "training": {"max_steps": 3, "batch_size": 4, "max_seq_len": 24, "learning_rate": 0.02,
                         "eval_every": 0, "eval_batches": 1, "seed": 0, "eval_generate": 0}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{method: output dir}, every method trained by its own `peft-studio train`, all at once."""
    root = tmp_path_factory.mktemp("lycoris")
    script = Path(sys.executable).parent / "peft-studio"
    procs = {}
    for name, method in TRAINED.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(run_config(method)))
        procs[name] = subprocess.Popen([str(script), "train", str(root / f"{name}.yaml"), "--out", str(root / name)],
                                       cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{out}\n{err[-3000:]}"
    return {name: root / name for name in TRAINED}


def batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits(model, b):
    model.eval()
    return model(**b).logits.float()


@pytest.mark.slow   # four `peft-studio train` processes: ~20 s of CPU together on 2 idle cores
@pytest.mark.parametrize("name", list(TRAINED))
def test_cli_trained_adapter_loads_in_peft_with_our_logits(name, trained):
    out = trained[name]
    cfg = parse_run_config(run_config(TRAINED[name]))
    assert json.loads((out / PEFT_CONFIG).read_text())["peft_type"] == PEFT_TYPES[name]
    base = load_base(cfg, []).model
    b = batch(base.config.vocab_size)
    base_out = logits(copy.deepcopy(base), b)
    ours = logits(load_trained(cfg, out).model, b)      # the studio's path back
    assert (ours - base_out).abs().max() > 1e-4, "training left the adapter at the base model"
    theirs = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)), b)
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    # ... and the engine's peft importer (from adapter_config.json alone) agrees too
    back = load_peft_adapter_into(copy.deepcopy(base), out)
    torch.testing.assert_close(logits(back, b), ours, atol=ATOL, rtol=0)


def peft_made(name: str):
    """A peft config of the method with non-default options, and an engine method config
    for the same adapter."""
    if name == "loha":
        return (peft.LoHaConfig(r=3, alpha=5, target_modules=["k_proj", "up_proj"], rank_pattern={"up_proj": 2},
                                init_weights=False),
                {"name": "loha", "r": 3, "alpha": 5, "target_modules": ["k_proj", "up_proj"],
                 "rank_pattern": {"up_proj": 2}})
    if name == "lokr":
        return (peft.LoKrConfig(r=4, alpha=3, target_modules=["o_proj", "gate_proj"], decompose_factor=4,
                                rank_pattern={"gate_proj": 1}, init_weights=False),
                {"name": "lokr", "r": 4, "alpha": 3, "target_modules": ["o_proj", "gate_proj"], "decompose_factor": 4,
                 "rank_pattern": {"gate_proj": 1}})
    if name == "vera":
        return (peft.VeraConfig(r=12, target_modules=["k_proj", "down_proj"], projection_prng_key=3,
                                init_weights=False),
                {"name": "vera", "r": 12, "target_modules": ["k_proj", "down_proj"], "projection_prng_key": 3})
    if name == "oft":
        return (peft.OFTConfig(r=4, oft_block_size=0, target_modules=["k_proj", "up_proj"], block_share=True,
                               use_cayley_neumann=False, init_weights=False),
                {"name": "oft", "r": 4, "oft_block_size": 0, "target_modules": ["k_proj", "up_proj"],
                 "block_share": True, "use_cayley_neumann": False})
    raise KeyError(name)


@pytest.mark.parametrize("name", list(TRAINED))
def test_peft_made_adapter_imports_with_equal_logits_and_counts(name, tmp_path):
    pcfg, ours_cfg = peft_made(name)
    base = load_model("tiny-llama", "causal_lm").model
    pristine = copy.deepcopy(base)
    b = batch(base.config.vocab_size)
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, pcfg)
    theirs = logits(pm, b)
    assert (theirs - logits(copy.deepcopy(pristine), b)).abs().max() > 1e-4
    spec = get_method(name)
    n_peft = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert spec.count_trainable(dims_of_model(pristine), parse_method_config(ours_cfg), "causal_lm") == n_peft
    pm.save_pretrained(str(tmp_path))
    back = load_peft_adapter_into(copy.deepcopy(pristine), tmp_path)
    torch.testing.assert_close(logits(back, b), theirs, atol=ATOL, rtol=0)


def test_vera_projections_rebuild_from_the_seed_without_save_projection(tmp_path):
    """peft draws A and B from projection_prng_key; so do we: an adapter saved by peft
    without its projections imports with the same logits."""
    pcfg = peft.VeraConfig(r=8, target_modules=["q_proj", "up_proj"], projection_prng_key=5, save_projection=False,
                           init_weights=False)
    base = load_model("tiny-llama", "causal_lm").model
    pristine = copy.deepcopy(base)
    b = batch(base.config.vocab_size)
    pm = peft.get_peft_model(base, pcfg)
    theirs = logits(pm, b)
    pm.save_pretrained(str(tmp_path))
    back = load_peft_adapter_into(copy.deepcopy(pristine), tmp_path)
    torch.testing.assert_close(logits(back, b), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method,field", [
    ({"name": "loha", "r": 0}, "r"),
    ({"name": "loha", "rank_dropout": 1.0}, "rank_dropout"),
    ({"name": "loha", "rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"name": "loha", "bogus": 1}, "bogus"),
    ({"name": "lokr", "decompose_factor": 0}, "decompose_factor"),
    ({"name": "lokr", "alpha_pattern": {"q_proj": -1.0}}, "alpha_pattern"),
    ({"name": "vera", "vera_dropout": -0.1}, "vera_dropout"),
    ({"name": "vera", "target_modules": []}, "target_modules"),
    ({"name": "oft", "r": 4}, "oft_block_size"),
    ({"name": "oft", "oft_block_size": 0}, "oft_block_size"),
    ({"name": "oft", "num_cayley_neumann_terms": 0}, "num_cayley_neumann_terms"),
])
def test_bad_config_names_the_field(method, field):
    with pytest.raises(ValueError, match=field):
        parse_method_config(method)
