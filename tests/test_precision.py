"""The precision contract (engine.precision, docs/precision.md) on CPU, where bf16 and
fp16 are real: frozen base weights in the run dtype, trainable parameters and their
optimizer states fp32 for every method, autocast training that learns, fp16 with a
GradScaler, QLoRA's compute dtype, and the streaming loader (engine.loading)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import parse_run_config
from engine.data import Examples
from engine.loading import CheckpointError, checkpoint_index
from engine.methods import METHODS
from engine.models import ModelLoadError, load_model
from engine.precision import autocast_dtype, check_contract, run_dtype, run_dtype_name
from engine.prepare import prepare_run
from engine.train import train

SETUPS = [("tiny-llama", "causal_lm", "demo-instruct"), ("tiny-bert", "classification", "demo-sentiment")]


def run_cfg(model="tiny-llama", task="causal_lm", method=None, precision="bf16", steps=1, **training):
    ds = "demo-instruct" if task == "causal_lm" else "demo-sentiment"
    return parse_run_config({
        "model": model, "task": task, "dataset": {"name": ds, "max_rows": 64},
        "method": method or {"name": "lora", "r": 4},
        "training": {"max_steps": steps, "batch_size": 8, "max_seq_len": 48, "eval_every": 0, "eval_batches": 1,
                     "eval_generate": 0, "precision": precision, "device": "cpu", "learning_rate": 5e-3,
                     **training}})


def no_data(task: str) -> Examples:
    return Examples(task=task, train=[], validation=[], labels=["neg", "pos"] if task == "classification" else [])


# ---- resolution ---------------------------------------------------------------------------------

def test_one_function_resolves_precision_on_a_device():
    assert run_dtype("auto", torch.device("cpu")) == torch.float32
    assert run_dtype("auto", "cuda") == torch.bfloat16
    assert run_dtype("auto", "cuda:NVIDIA H200") == torch.bfloat16
    for dev in ("cpu", "cuda"):
        assert run_dtype("fp32", dev) == torch.float32
        assert run_dtype("bf16", dev) == torch.bfloat16
        assert run_dtype("fp16", dev) == torch.float16
    assert autocast_dtype("fp32", "cuda") is None and autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="training.precision"):
        run_dtype_name("fp8", "cpu")


def test_the_estimators_run_helper_resolves_precision_the_same_way():
    from engine.estimator.runs import estimate_run

    cfg = run_cfg(precision="auto", device="auto")     # (device cpu would train on the CPU on any worker)
    assert estimate_run(cfg, "tiny-llama", device="cpu").inputs["dtype"] == "fp32"
    assert estimate_run(cfg, "tiny-llama", device="cuda:NVIDIA H200").inputs["dtype"] == "bf16"
    assert estimate_run(run_cfg(precision="auto"), "tiny-llama", device="cuda:NVIDIA H200").inputs["dtype"] == "fp32"
    assert estimate_run(run_cfg(precision="fp16"), "tiny-llama", device="cpu").inputs["dtype"] == "fp16"


# ---- the contract for every method --------------------------------------------------------------

# the only refusal expected (any other one fails the test rather than skipping it): LLaMA-Adapter's
# gated prompts need Llama attention
REFUSALS = {("llama_adapter", "tiny-bert"): "method.name: llama_adapter needs a Llama-architecture model"}

@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("model,task,_ds", SETUPS)
def test_frozen_base_in_bf16_and_trainables_fp32_for_every_method(name, model, task, _ds):
    cfg = run_cfg(model, task, {"name": name})
    expected = REFUSALS.get((name, model))
    try:
        prep = prepare_run(cfg, examples=no_data(task))
    except ValueError as e:
        if expected is not None and str(e).startswith(expected):
            pytest.skip(f"{name} refuses {model}, as expected: {e}")
        raise
    assert expected is None, f"{name} now accepts {model}: take the pair out of REFUSALS"
    assert check_contract(prep.model, torch.bfloat16) == []
    params = {id(p): p for p in prep.model.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad and p.is_floating_point()]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    # the bulk of the frozen weights is bf16 (LayerNorm keeps fp32; a quantized base is uint8)
    frozen_bf16 = sum(p.numel() for p in frozen if p.dtype == torch.bfloat16)
    frozen_fp32 = sum(p.numel() for p in frozen if p.dtype == torch.float32)
    if frozen:
        assert frozen_bf16 > 10 * frozen_fp32, (name, frozen_bf16, frozen_fp32)
    assert all(p.device.type == "cpu" for p in params)


def test_fp32_is_unchanged():
    prep = prepare_run(run_cfg(precision="fp32"), examples=no_data("causal_lm"))
    assert {p.dtype for p in prep.model.parameters()} == {torch.float32}
    ref = load_model("tiny-llama", "causal_lm").model
    assert torch.equal(prep.model.get_input_embeddings().weight, ref.get_input_embeddings().weight)


def test_full_fine_tuning_starts_from_the_exact_fp32_checkpoint(tmp_path):
    """`full` under bf16: the frozen copy never exists, and its fp32 master weights are
    the checkpoint's own values, re-read from the file, not their bf16 rounding."""
    d = tmp_path / "tiny"
    lm = load_model("tiny-llama", "causal_lm")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    cfg = run_cfg(str(d), method={"name": "full"})
    prep = prepare_run(cfg, examples=no_data("causal_lm"), allowed_roots=[tmp_path])
    saved = load_file(str(d / "model.safetensors"))
    mine = dict(prep.model.named_parameters())
    w = "model.layers.0.self_attn.q_proj.weight"
    assert mine[w].dtype == torch.float32 and mine[w].requires_grad
    assert torch.equal(mine[w].detach(), saved[w])
    assert not torch.equal(saved[w].bfloat16().float(), saved[w])   # bf16 rounding would have shown


# ---- training under bf16 / fp16 -----------------------------------------------------------------

def test_bf16_run_learns_and_keeps_fp32_optimizer_states():
    prep = prepare_run(run_cfg(steps=30, checkpoint_every=29))
    states = []
    res = train(prep, on_checkpoint=lambda step, st: states.append(st))
    losses = [h["loss"] for h in res.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert check_contract(prep.model, torch.bfloat16) == []
    opt = states[-1]["optimizer"]["state"]
    tensors = [t for s in opt.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert tensors and {t.dtype for t in tensors} == {torch.float32}
    assert all(t.dtype == torch.float32 for t in states[-1]["trainable"].values())


def test_fp16_run_uses_a_grad_scaler():
    """At the scaler's first scale (2^16) this step's fp16 gradients overflow: the
    scaler skips it (no update, nothing non-finite); without one it would be applied.
    A longer run finds a scale that fits, updates and learns."""
    prep = prepare_run(run_cfg(precision="fp16", steps=1, max_grad_norm=None))
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters() if p.requires_grad}
    with pytest.warns(UserWarning, match="lr_scheduler.step"):   # torch says the skipped step was skipped
        train(prep)
    after = dict(prep.model.named_parameters())
    assert all(torch.equal(after[n].detach(), v) for n, v in before.items())

    prep = prepare_run(run_cfg(precision="fp16", steps=30))
    res = train(prep)
    losses = [h["loss"] for h in res.history]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert all(torch.isfinite(p).all() for p in prep.model.parameters() if p.is_floating_point())


def test_an_fp16_run_resumes_with_its_loss_scale():
    """The loss scale is part of the training state: a run resumed from a checkpoint
    (through the state file's encoding) takes the same steps as the uninterrupted run.
    Restarting at the scaler's initial 2^16 would overflow and skip a step the
    uninterrupted run took, and the losses after it would differ."""
    from engine.state_file import state_from_bytes, state_to_bytes

    states = []    # persisted at once, as the worker does: the optimizer tensors in a state are live
    straight = train(prepare_run(run_cfg(precision="fp16", steps=8, max_grad_norm=None, checkpoint_every=4)),
                     on_checkpoint=lambda step, st: states.append(state_to_bytes(st)))
    state = state_from_bytes(states[0])
    assert len(states) == 1 and state["scaler"]["scale"] < 2.0 ** 16   # the first step overflowed and lowered it
    resumed = train(prepare_run(run_cfg(precision="fp16", steps=8, max_grad_norm=None, checkpoint_every=4)),
                    resume_state=state)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[4:]]


# ---- QLoRA's compute dtype ----------------------------------------------------------------------

@pytest.mark.parametrize("precision,compute,want", [
    ("bf16", "auto", torch.bfloat16), ("fp32", "auto", torch.float32), ("bf16", "fp32", torch.float32),
    ("fp32", "bf16", torch.bfloat16), ("fp16", "auto", torch.float16)])
def test_qlora_compute_dtype_follows_the_run(precision, compute, want):
    from engine.methods.qlora import NF4Linear

    prep = prepare_run(run_cfg(method={"name": "qlora", "r": 4, "compute_dtype": compute}, precision=precision),
                       examples=no_data("causal_lm"))
    layers = [m for m in prep.model.modules() if isinstance(m, NF4Linear)]
    assert layers and {m.compute_dtype for m in layers} == {want}
    assert prep.model._quantization_report["total"]["numel"] > 0


def test_qlora_on_a_model_loaded_elsewhere_keeps_its_own_lora_init():
    """A loaded fp32 copy (as engine.measure passes one) is cast, then QLoRA frees the
    linears it quantizes: a new LoRA matrix may get a freed weight's id(), and must not
    be handed that weight's old fp32 value as its 'exact' one (engine.precision.ParamMap)."""
    from engine.methods.lora import LoraLinear
    from engine.loss import compute_loss

    from engine.measure import prepare_for_measure

    loaded = load_model("tiny-llama", "causal_lm")
    prep = prepare_for_measure("tiny-llama", {"name": "qlora"}, task="causal_lm", loaded=loaded, precision="bf16")
    layers = [m for m in prep.model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(not m.lora_B.weight.any() for m in layers)          # B starts at zero
    assert all(m.lora_A.weight.shape == (m.r, m.in_features) for m in layers)
    assert check_contract(prep.model, torch.bfloat16) == []
    ids = torch.randint(1000, 2000, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_loss(prep.model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "labels": ids}, "causal_lm")
    loss.backward()
    assert torch.isfinite(loss)


def test_qlora_quantizes_while_streaming(tmp_path):
    """A local checkpoint: every block linear arrives as NF4 (the loader's transform),
    so apply_qlora finds them quantized already and keeps their load-time error report."""
    from engine.methods.qlora import NF4Linear, QuantizeOnLoad, QLoraConfig, quantizable_names

    d = tmp_path / "tiny"
    lm = load_model("tiny-llama", "causal_lm")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    expect = quantizable_names(lm.model)
    got = load_model(str(d), "causal_lm", allowed_roots=[tmp_path], dtype=torch.bfloat16,
                     transform=QuantizeOnLoad(QLoraConfig(), torch.bfloat16)).model
    assert [n for n, m in got.named_modules() if isinstance(m, NF4Linear)] == expect
    assert all(got.get_submodule(n).load_error["numel"] > 0 for n in expect)
    prep = prepare_run(run_cfg(str(d), method={"name": "qlora", "r": 4}), examples=no_data("causal_lm"),
                       allowed_roots=[tmp_path])
    assert set(prep.model._quantization_report["modules"]) == set(expect)
    assert check_contract(prep.model, torch.bfloat16) == []


# ---- the streaming loader -----------------------------------------------------------------------

def test_streaming_loader_matches_transformers_at_fp32_and_bf16(tmp_path):
    """Same tensors as from_pretrained: every checkpoint weight, the seeded new
    classification head, and the tied output embedding."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    d = tmp_path / "tiny"
    lm = load_model("tiny-llama", "causal_lm")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    for task, cls in (("causal_lm", AutoModelForCausalLM), ("classification", AutoModelForSequenceClassification)):
        extra = {"num_labels": 3} if task == "classification" else {}
        torch.manual_seed(7)
        ref = cls.from_pretrained(d, dtype=torch.float32, **extra).state_dict()
        for dtype in (torch.float32, torch.bfloat16):
            got = load_model(str(d), task, num_labels=3, seed=7, allowed_roots=[tmp_path], dtype=dtype).model
            sd = got.state_dict()
            assert set(sd) == set(ref)
            for k, v in sd.items():
                assert torch.equal(v, ref[k].to(v.dtype)), (task, dtype, k)
                assert v.dtype == (dtype if v.is_floating_point() and "inv_freq" not in k else ref[k].dtype), k
            if task == "causal_lm":
                assert got.get_output_embeddings().weight is got.get_input_embeddings().weight


def test_streaming_loader_refuses_a_damaged_checkpoint_naming_file_and_tensor(tmp_path):
    d = tmp_path / "tiny"
    lm = load_model("tiny-llama", "causal_lm")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.norm.weight"] = torch.ones(7)            # wrong shape
    save_file(tensors, str(f))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*'model\.norm\.weight'.*shape"):
        load_model(str(d), "causal_lm", allowed_roots=[tmp_path], dtype=torch.bfloat16)
    f.write_bytes(f.read_bytes()[:-100])                      # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        checkpoint_index(d)


def test_tiny_models_are_built_in_the_dtype():
    m = load_model("tiny-llama", "causal_lm", dtype=torch.bfloat16).model
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


# ---- downstream of a bf16 run -------------------------------------------------------------------

def test_a_bf16_run_generates_merges_and_reloads_in_fp32(tmp_path):
    """Evaluation with generation metrics runs on the bf16 model; merging folds the fp32
    LoRA into the bf16 weights with the adapted model's outputs; the saved adapter
    rebuilt on a fresh (fp32) base gives the same outputs to bf16 precision."""
    import shutil
    from transformers import AutoModelForCausalLM
    from engine.adapters import load_trained, merged_model_files, save_adapter

    cfg = run_cfg(steps=4, eval_every=4, eval_generate=2, eval_generate_tokens=4, learning_rate=2e-2,
                  method={"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    prep = prepare_run(cfg)
    res = train(prep)
    assert res.eval["gen_rows"] == 2 and "rouge_l" in res.eval
    save_adapter(prep, tmp_path / "a")
    ids = torch.randint(1000, 2000, (2, 10), generator=torch.Generator().manual_seed(0))
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    prep.model.eval()
    with torch.no_grad(), amp:
        adapted = prep.model(input_ids=ids).logits.float()
    back = load_trained(cfg, tmp_path / "a")
    assert {p.dtype for p in back.model.parameters()} == {torch.float32}
    with torch.no_grad(), amp:
        reloaded = back.model(input_ids=ids).logits.float()
    d = merged_model_files(prep)
    try:
        merged = AutoModelForCausalLM.from_pretrained(d).eval()
        assert merged.get_input_embeddings().weight.dtype == torch.bfloat16
        with torch.no_grad(), amp:
            folded = merged(input_ids=ids).logits.float()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    base = load_model("tiny-llama", "causal_lm", dtype=torch.bfloat16).model.eval()
    with torch.no_grad(), amp:
        plain = base(input_ids=ids).logits.float()
    tol = 2e-2 * adapted.abs().max()
    moved = (adapted - plain).abs().max()
    assert moved > 5 * tol                    # the adapter changes the outputs: the comparisons can fail
    assert (folded - adapted).abs().max() <= tol
    assert (reloaded - adapted).abs().max() <= tol
