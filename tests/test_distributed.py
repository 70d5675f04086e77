"""Distributed training on CPU with real processes (gloo): N ranks of `peft-studio train`
take the same steps as one process with the same global batch, for DDP and FSDP2;
AdaLoRA's rank allocation under DDP; checkpoints across world sizes; cancel; a rank
killed mid-run; refusals with the reason."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine.config import ConfigError, parse_run_config
from engine.distributed import DistributedError, shard_batch, Dist
from engine.launch import launch_local, rank_places
from engine.prepare import prepare_run
from engine.train import train

PEFT_STUDIO = Path(sys.executable).parent / "peft-studio"
GLOBAL_BATCH = 8


def config(world=1, strategy="ddp", method=None, steps=6, **training):
    return {
        "name": f"dist-{world}-{strategy}", "model": "tiny-llama", "task": "causal_lm",
        "dataset": {"name": "demo-instruct", "max_rows": 96},
        "method": method or {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": steps, "batch_size": GLOBAL_BATCH // world, "grad_accum": 2, "learning_rate": 2e-2,
                     "max_seq_len": 32, "eval_every": 3, "eval_batches": 2, "seed": 3, "eval_generate": 0,
                     "distributed": {"world_size": world, "strategy": strategy}, **training}}


def cli_train(tmp_path: Path, cfg: dict, name: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / name
    p = subprocess.run([str(PEFT_STUDIO), "train", str(path), "--out", str(out)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return p, out


def finished(tmp_path, cfg, name) -> tuple[dict, dict, list[dict], str]:
    p, out = cli_train(tmp_path, cfg, name)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    weights = [f for f in ("adapter_model.safetensors", "studio_adapter.safetensors") if (out / f).exists()]
    tensors = load_file(out / weights[0])     # peft's format, or ours for methods peft cannot hold
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert not list(out.glob(".launch-*")) and not list(out.glob(".*tmp*"))
    return results, tensors, metrics, p.stderr


def assert_same_run(a: tuple, b: tuple) -> None:
    (ra, ta, ma, _), (rb, tb, mb, _) = a, b
    assert ra["steps"] == rb["steps"] == len(ma) == len(mb)
    assert ra["final_loss"] == pytest.approx(rb["final_loss"], rel=1e-4)
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4), (x["step"], x["loss"], y["loss"])
    assert ra["eval"]["eval_loss"] == pytest.approx(rb["eval"]["eval_loss"], rel=1e-4)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        scale = tb[k].abs().max().item()
        assert scale > 0, k
        assert (ta[k] - tb[k]).abs().max().item() <= 1e-3 * scale, k


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return finished(tmp_path_factory.mktemp("one"), config(1), "one")


def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, one_rank):
    two = finished(tmp_path, config(2, "ddp"), "ddp")
    assert_same_run(two, one_rank)
    results, _, metrics, stderr = two
    assert results["world_size"] == 2 and len(results["rank_peak_memory_bytes"]) == 2
    assert all(b > 0 for b in results["rank_peak_memory_bytes"])
    assert "2 ranks" in stderr and "6/6" in stderr     # rank 0's progress bar
    assert [m["step"] for m in metrics] == list(range(1, 7)) and metrics[2]["eval"]["perplexity"] > 1
    # the lora_B tensors moved away from their zero start: the comparison above is not vacuous
    assert all(t.abs().max() > 1e-3 for k, t in two[1].items() if "lora_B" in k)


def test_fsdp_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, one_rank):
    two = finished(tmp_path, config(2, "fsdp"), "fsdp")
    assert_same_run(two, one_rank)
    assert two[0]["world_size"] == 2


def test_adalora_rank_allocation_under_ddp_matches_one_process(tmp_path):
    method = {"name": "adalora", "init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1,
              "target_modules": ["q_proj", "v_proj"]}
    one = finished(tmp_path, config(1, method=method), "ada1")
    two = finished(tmp_path, config(2, "ddp", method=method), "ada2")
    assert_same_run(two, one)
    # the allocation ran: singular values were masked down to the target budget, the same on both
    e = [t for k, t in two[1].items() if "lora_E" in k]
    assert e and sum(int((t != 0).sum()) for t in e) <= 2 * len(e)


def test_a_two_rank_checkpoint_resumes_on_one_rank(tmp_path, one_rank):
    states, seen = {}, []
    res = launch_local(config(2, "ddp", checkpoint_every=3), tmp_path / "two", on_progress=lambda m: seen.append(m),
                       on_checkpoint=lambda step, st: states.setdefault(step, st))
    assert [m["step"] for m in seen] == list(range(1, 7)) and res.steps == 6
    assert set(states) == {3} and states[3]["step"] == 3
    resumed = train(prepare_run(parse_run_config(config(1))), resume_state=states[3])
    ref = one_rank[2]
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    for h, r in zip(resumed.history, ref[3:]):
        assert h["loss"] == pytest.approx(r["loss"], rel=1e-4)
    assert resumed.final_loss == pytest.approx(one_rank[0]["final_loss"], rel=1e-4)


def test_cancel_stops_every_rank_with_a_resumable_state(tmp_path):
    seen = []
    res = launch_local(config(2, "ddp", steps=5000, eval_every=0), tmp_path / "c", on_progress=seen.append,
                       should_stop=lambda: len(seen) >= 3)
    assert res.cancelled and 3 <= res.steps < 5000
    assert res.last_state is not None and res.last_state["step"] == res.steps
    assert not (tmp_path / "c" / "adapter_model.safetensors").exists()


def test_a_failing_progress_callback_stops_the_ranks_and_reaches_the_caller(tmp_path):
    def on_progress(m):
        if m["step"] == 2:
            raise OSError("database went away")

    with pytest.raises(OSError, match="database went away"):
        launch_local(config(2, "ddp", steps=5000, eval_every=0), tmp_path / "f", on_progress=on_progress)
    assert not list((tmp_path / "f").glob(".launch-*"))


def test_sigkill_of_one_rank_fails_the_run_naming_the_rank(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(config(2, "ddp", steps=100000, eval_every=0)))
    out = tmp_path / "long"
    proc = subprocess.Popen([str(PEFT_STUDIO), "train", str(path), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        places = []
        while time.monotonic() < deadline:
            places = rank_places(out)
            tmp = out / ".metrics.jsonl.tmp"
            if len(places) == 2 and tmp.exists() and len(tmp.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        assert [p["rank"] for p in places] == [0, 1], places
        os.kill(places[1]["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert f"rank 1 (pid {places[1]['pid']}) was killed by signal SIGKILL" in err
    assert "Traceback" not in err.split("error:")[-1]
    time.sleep(1)
    with pytest.raises(ProcessLookupError):     # the surviving rank was stopped too
        os.kill(places[0]["pid"], 0)


def test_fsdp_refuses_a_method_whose_hooks_need_whole_tensors(tmp_path):
    method = {"name": "adalora", "init_r": 4, "target_r": 2, "target_modules": ["q_proj"]}
    p, _ = cli_train(tmp_path, config(2, "fsdp", method=method), "refused", timeout=120)
    assert p.returncode == 1
    assert "method 'adalora' cannot run with training.distributed.strategy 'fsdp'" in p.stderr
    assert "use strategy 'ddp'" in p.stderr and "Traceback" not in p.stderr


def test_world_size_above_one_needs_a_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    prep = prepare_run(parse_run_config(config(2, steps=1)))
    with pytest.raises(DistributedError, match=r"world_size is 2 .*launch_local.*torchrun --nproc-per-node 2"):
        train(prep)


@pytest.mark.parametrize("bad,field", [({"world_size": 0}, "training.distributed.world_size"),
                                       ({"strategy": "zero3"}, "training.distributed.strategy"),
                                       ({"world": 2}, "training.distributed.world"),
                                       ({"world_size": "two"}, "training.distributed.world_size")])
def test_bad_distributed_settings_name_the_field(bad, field):
    cfg = config(1)
    cfg["training"]["distributed"] = bad
    with pytest.raises(ConfigError, match=field):
        parse_run_config(cfg)


def test_each_rank_takes_its_share_and_weight_of_a_global_batch():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 0, 0], [5, 6, 7, 8], [5, 0, 0, 0], [5, 6, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    total = int((labels[:, 1:] != -100).sum())
    shares, weights = [], []
    for r in range(2):
        local, w = shard_batch(batch, Dist(r, 2, r, "ddp", torch.device("cpu"), "gloo"), "causal_lm")
        shares.append(local)
        weights.append(w)
    assert [s["input_ids"].shape for s in shares] == [(3, 4), (2, 2)]     # padding-only columns dropped
    assert sum(weights) == pytest.approx(2.0)                             # sums to the world size
    assert weights[0] == pytest.approx(2 * 6 / total)                     # rows 0-2 predict 2+1+3 tokens
    # more ranks than rows: the empty rank computes on one row with weight 0
    local, w = shard_batch({k: v[:1] for k, v in batch.items()}, Dist(1, 2, 1, "ddp", torch.device("cpu"), "gloo"),
                           "causal_lm")
    assert w == 0.0 and local["input_ids"].shape[0] == 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_bf16_run_on_two_ranks_takes_one_process_steps(tmp_path, strategy):
    """training.precision bf16: each rank holds the bf16 base and fp32 trainables (FSDP2
    all-gathers and computes each unit in bf16 and reduces gradients in fp32,
    engine.distributed.mixed_precision_policy); the losses follow one process's to
    bf16 precision, and the exported adapter is fp32 as ever."""
    one = finished(tmp_path, config(1, precision="bf16"), "one")
    two = finished(tmp_path, config(2, strategy, precision="bf16"), strategy)
    (ra, ta, ma, _), (rb, tb, mb, _) = one, two
    assert ra["steps"] == rb["steps"] == 6
    for x, y in zip(ma, mb):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-2), (x["step"], x["loss"], y["loss"])
    assert ta.keys() == tb.keys() and {t.dtype for t in tb.values()} == {torch.float32}
    assert all(t.abs().max() > 1e-3 for k, t in tb.items() if "lora_B" in k)
