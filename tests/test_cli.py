"""The console script: train, estimate, db, and their errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "studio.cli", *args], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "peft-studio").exists()


def test_train_writes_adapter_metrics_and_metadata(tmp_path):
    cfg = {"name": "cli-run", "model": "tiny-llama", "task": "causal_lm", "dataset": {"name": "demo-instruct",
                                                                                       "max_rows": 64},
           "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
           "training": {"max_steps": 4, "batch_size": 4, "max_seq_len": 32, "eval_every": 2, "eval_batches": 2, "eval_generate": 4, "eval_generate_tokens": 4}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    p = cli("train", str(tmp_path / "run.yaml"), "--out", str(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "peft_studio.json", "metrics.jsonl"} <= \
        {f.name for f in out.iterdir()}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[1]["eval"]["perplexity"] > 1
    assert "step" in p.stderr and "4/4" in p.stderr   # the tqdm progress bar
    assert not list(out.glob(".*tmp*"))


def test_train_reports_bad_config_clearly(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({
        "model": "tiny-bert", "dataset": {"name": "demo-sentiment"},
        "method": {"name": "lora", "r": 4, "target_modules": ["query", "valu"]}}))
    p = cli("train", str(tmp_path / "bad.yaml"), check=False)
    assert p.returncode == 2
    assert "method.target_modules" in p.stderr and "'valu'" in p.stderr and "value" in p.stderr
    assert "Traceback" not in p.stderr


def test_estimate_json_has_the_contract_keys():
    p = cli("estimate", "--model", "llama-2-7b", "--method", "lora", "--r", "8", "--target-modules",
            "q_proj,v_proj", "--batch", "1", "--seq", "512", "--json")
    d = json.loads(p.stdout)
    assert set(d) == {"n_params", "n_trainable", "rows"}
    assert set(d["rows"]) == {"cuda_context", "weights", "gradients", "hidden_states", "optimizer", "total"}
    assert d["n_params"] == 6_738_415_616 and d["n_trainable"] == 4_194_304
    assert all(isinstance(v, int) for v in d["rows"].values())


def test_estimate_unknown_model_is_a_clear_error():
    p = cli("estimate", "--model", "no-such-model", "--method", "lora", "--json", check=False)
    assert p.returncode == 2 and "no-such-model" in p.stderr and "Traceback" not in p.stderr


def test_estimate_per_device_rows_for_world_size_strategy_and_optimizer():
    base = ("estimate", "--model", "llama-2-7b", "--method", "lora", "--target-modules", " q_proj, v_proj ,",
            "--batch", "1", "--seq", "512", "--json")
    one = json.loads(cli(*base).stdout)
    ddp = json.loads(cli(*base, "--world-size", "4", "--strategy", "ddp").stdout)
    fsdp = json.loads(cli(*base, "--world-size", "4", "--strategy", "fsdp").stdout)
    assert one["n_trainable"] == 4_194_304          # the list parser dropped blanks and spaces
    assert ddp["rows"]["weights"] == one["rows"]["weights"]                  # DDP replicates
    assert fsdp["rows"]["weights"] < one["rows"]["weights"] / 2              # FSDP shards them
    assert fsdp["rows"]["total"] < one["rows"]["total"]
    eight = json.loads(cli(*base, "--optimizer", "adamw_8bit").stdout)
    assert eight["rows"]["optimizer"] < one["rows"]["optimizer"]
    text = cli(*base[:-1], "--world-size", "2", "--strategy", "fsdp").stdout
    assert "per device of 2 (fsdp)" in text


@pytest.mark.parametrize("flag,value,says", [("--world-size", "0", "must be at least 1"),
                                             ("--world-size", "two", "expected a whole number"),
                                             ("--strategy", "zero3", "invalid choice"),
                                             ("--optimizer", "lion", "invalid choice")])
def test_estimate_bad_distributed_flags_name_the_flag(flag, value, says):
    p = cli("estimate", "--model", "gpt2", "--method", "lora", flag, value, check=False)
    assert p.returncode == 2 and flag in p.stderr and says in p.stderr


def test_db_upgrade_and_current(tmp_path):
    p = cli("db", "upgrade")
    assert "upgrade" in p.stdout
    assert "(head)" in cli("db", "current").stdout
