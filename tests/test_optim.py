"""8-bit and paged AdamW (engine.optim): the dynamic code against a float64
reference, loss tracking against fp32 AdamW, state bytes, exact resume through
a tensors-and-JSON checkpoint, and config validation."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ConfigError, parse_run_config
from engine.optim import (BLOCK, AdamW8bit, dequantize_blockwise, dynamic_map, make_optimizer, quantize_blockwise,
                          quantize_codes, state_nbytes)
from engine.prepare import prepare_run
from engine.train import train


def decade_half_step(a: torch.Tensor, signed: bool) -> torch.Tensor:
    """The code's resolution at |y| = a: in decade e (10^-(e+1) < a <= 10^-e) the
    2^f codes are 0.9·10^-e / 2^f apart (f = 6 - e signed, 7 - e unsigned), so the
    nearest one is at most half that away; below the smallest code 10^-emax the
    choice is {0, 10^-emax}, at most 0.5·10^-emax away."""
    bits, emax = (7, 6) if signed else (8, 7)
    e = torch.floor(-torch.log10(a.clamp(min=1e-300))).clamp(0, emax)
    f = (bits - 1) - e
    half = 0.45 * 10.0 ** (-e) / 2.0 ** f
    return torch.where(a < 10.0 ** -emax, torch.full_like(a, 0.5 * 10.0 ** -emax), half)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_code_is_the_nearest_value_within_its_resolution(signed):
    qmap = dynamic_map(signed)
    assert qmap.numel() == 256 and qmap.abs().max() == 1.0 and (qmap == 0).any()
    assert (qmap < 0).any() == signed
    g = torch.Generator().manual_seed(0)
    y = torch.rand(200_000, generator=g, dtype=torch.float64) ** 8          # many small magnitudes
    if signed:
        y = y * (torch.randint(0, 2, y.shape, generator=g) * 2 - 1)
    codes = quantize_codes(y.float(), signed)
    err = (qmap[codes.long()] - y).abs()
    assert (err <= decade_half_step(y.abs(), signed) * (1 + 1e-6) + 1e-7).all()
    # against the float64 nearest entry of the map: equal up to float32 rounding of y
    s = qmap.sort().values
    pos = torch.searchsorted(s, y).clamp(1, 255)
    nearest = torch.minimum((s[pos - 1] - y).abs(), (s[pos] - y).abs())
    assert (err - nearest).max() < 1e-7


@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_round_trip_against_float64(signed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3 * BLOCK + 517, generator=g, dtype=torch.float64) * torch.logspace(-6, 0, 3 * BLOCK + 517,
                                                                                      dtype=torch.float64)
    x[BLOCK:2 * BLOCK] = 0.0                                                # an all-zero block
    if not signed:
        x = x * x
    codes, absmax = quantize_blockwise(x.float(), signed)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() and absmax.numel() == 4
    back = dequantize_blockwise(codes, absmax, signed).double()
    assert (back[BLOCK:2 * BLOCK] == 0).all()
    scale = torch.repeat_interleave(absmax.double(), BLOCK)[:x.numel()]
    bound = decade_half_step((x / scale.clamp(min=1e-30)).abs(), signed) * scale
    assert ((back - x).abs() <= bound * (1 + 1e-5) + 1e-7 * scale).all()
    # the block maximum itself is exact (the code has 1.0)
    top = x.view(-1)[:BLOCK].abs().argmax()
    assert back[top] == pytest.approx(x[top].item(), rel=1e-6)


def mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(256, 32, generator=g)
    y = torch.randint(0, 8, (256,), generator=g)
    return model, x, y


def run_steps(name, steps=50, lr=1e-3):
    model, x, y = mlp_problem()
    opt = make_optimizer(name, list(model.parameters()), lr=lr, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt


def test_8bit_tracks_fp32_adamw_and_keeps_under_a_third_of_its_state():
    ref, ref_opt = run_steps("adamw")
    assert ref[-1] < 0.5 * ref[0]                                           # a problem that actually learns
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        got, opt = run_steps(name)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert abs(a - b) <= 0.02 * b, f"{name} step {i + 1}: loss {a} vs fp32 AdamW {b}"
        assert got != ref                                                  # really quantized
        # the 32x128 weight is 8-bit; the biases (< 1024 values) stay fp32
        assert "exp_avg_code" in opt.state[opt.param_groups[0]["params"][0]]
        assert "exp_avg" in opt.state[opt.param_groups[0]["params"][3]]
        w, w_ref = opt.param_groups[0]["params"][0], ref_opt.param_groups[0]["params"][0]
        assert state_nbytes_of(opt, w) <= 0.3 * state_nbytes_of(ref_opt, w_ref)
    assert state_nbytes(opt) < state_nbytes(ref_opt)


def test_the_loss_bound_catches_a_linear_8bit_code(monkeypatch):
    """The same bound fails for a uniform 8-bit code: the dynamic code is what makes 8 bits enough."""
    import engine.optim as O
    from engine import fused
    ref, _ = run_steps("adamw")
    exact = O.quantize_codes
    monkeypatch.setattr(O, "quantize_codes", lambda y, signed: exact(torch.round(y * 127) / 127 if signed
                                                                      else torch.round(y * 255) / 255, signed))
    fused.set_enabled(False)                                             # the torch path, which the patch reaches
    try:
        got, _ = run_steps("adamw_8bit")
    finally:
        fused.set_enabled(True)
    assert max(abs(a - b) / b for a, b in zip(got, ref)) > 0.02


def state_nbytes_of(opt, p):
    return sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v) and v.dim() > 0)


def test_state_bytes_of_a_large_model_are_under_0_3_of_adamw():
    params = [torch.nn.Parameter(torch.randn(300, 70)), torch.nn.Parameter(torch.randn(5000))]
    for p in params:
        p.grad = torch.randn_like(p)
    ref = torch.optim.AdamW(params, lr=1e-3)
    ref.step()
    opt = AdamW8bit(params, lr=1e-3)
    opt.step()
    assert state_nbytes(opt) <= 0.3 * state_nbytes(ref)


def cfg(steps, **training):
    return parse_run_config({
        "name": "optim", "model": "tiny-llama", "task": "classification",
        "dataset": {"name": "demo-sentiment", "max_rows": 120},
        "method": {"name": "lora", "r": 128, "alpha": 128, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 2e-3, "max_seq_len": 32,
                     "eval_every": 0, "eval_batches": 1, "weight_decay": 0.01, "precision": "fp32",
                     "optimizer": "adamw_8bit", **training}})


def to_plain_files(state: dict, tmp_path) -> dict:
    """Write the optimizer state as safetensors + JSON (no pickle) and read it back."""
    tensors, meta = {}, {"state": {}, "param_groups": state["param_groups"]}
    for i, s in state["state"].items():
        meta["state"][str(i)] = {}
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v.contiguous()
                meta["state"][str(i)][k] = "tensor"
            else:
                assert isinstance(v, (int, float)), f"{k}: {type(v)}"
                meta["state"][str(i)][k] = v
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    loaded, meta = load_file(str(tmp_path / "opt.safetensors")), json.loads((tmp_path / "opt.json").read_text())
    return {"state": {int(i): {k: (loaded[f"{i}.{k}"] if v == "tensor" else v) for k, v in s.items()}
                      for i, s in meta["state"].items()}, "param_groups": meta["param_groups"]}


def test_checkpoint_resume_is_exact(tmp_path):
    states = {}
    straight = train(prepare_run(cfg(6, checkpoint_every=3)),
                     on_checkpoint=lambda step, st: states.setdefault(step, st))
    state = dict(states[3])
    opt_state = state["optimizer"]
    kinds = {k for s in opt_state["state"].values() for k in s}
    assert {"exp_avg_code", "exp_avg_absmax", "exp_avg"} <= kinds           # 8-bit LoRA, fp32 head
    assert all(v.dtype == torch.uint8 for s in opt_state["state"].values() for k, v in s.items() if "code" in k)
    state["optimizer"] = to_plain_files(opt_state, tmp_path)
    resumed = train(prepare_run(cfg(6)), resume_state=state)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[3:]]


def test_a_bad_optimizer_name_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"training\.optimizer"):
        cfg(2, optimizer="adam8")
    with pytest.raises(ValueError, match=r"training\.optimizer"):
        make_optimizer("lion", [torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    with pytest.raises(ValueError, match=r"training\.optimizer.*FSDP"):
        make_optimizer("adamw_8bit", [torch.nn.Parameter(torch.zeros(3))], lr=1e-3, fsdp=True)


def test_load_state_dict_refuses_a_state_of_another_shape():
    a = torch.nn.Parameter(torch.randn(5000))
    a.grad = torch.randn_like(a)
    opt = AdamW8bit([a], lr=1e-3)
    opt.step()
    sd = opt.state_dict()
    other = AdamW8bit([torch.nn.Parameter(torch.randn(6000))], lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg_absmax|exp_avg_code"):
        other.load_state_dict(sd)


def test_the_c_step_and_the_torch_step_agree():
    from engine import fused
    from engine.optim import kernel
    if kernel() is None:
        pytest.fail("the 8-bit AdamW C kernel did not build (a C compiler is part of every supported machine)")
    g = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(50_000, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = AdamW8bit([a], lr=1e-2, weight_decay=0.1), AdamW8bit([b], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        a.grad = torch.randn(a.shape, generator=g)
        b.grad = a.grad.clone()
        opt_a.step()                                   # C
        fused.set_enabled(False)
        try:
            opt_b.step()                               # torch ops
        finally:
            fused.set_enabled(True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for k in ("exp_avg_code", "exp_avg_sq_code"):
        assert (opt_a.state[a][k] != opt_b.state[b][k]).float().mean() < 1e-3   # float rounding at ties only


def ddp_cfg(world: int, batch: int, strategy: str = "ddp"):
    return parse_run_config({
        "name": "optim-ddp", "model": "tiny-llama", "task": "causal_lm",
        "dataset": {"name": "demo-instruct", "max_rows": 64},
        "method": {"name": "lora", "r": 32, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 4, "batch_size": batch, "learning_rate": 5e-3, "max_seq_len": 32,
                     "eval_every": 0, "eval_batches": 1, "precision": "fp32", "device": "cpu",
                     "optimizer": "adamw_8bit", "distributed": {"world_size": world, "strategy": strategy}, "eval_generate": 0}})


@pytest.mark.slow
def test_ddp_ranks_take_the_single_process_8bit_step_and_fsdp_is_refused(tmp_path):
    from engine.distributed import DistributedError
    from engine.launch import launch_local
    one = train(prepare_run(ddp_cfg(1, 8)))
    two = launch_local(ddp_cfg(2, 4), tmp_path / "ddp")
    assert [h["loss"] for h in two.history] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)
    with pytest.raises(DistributedError, match=r"training\.optimizer.*FSDP"):
        launch_local(ddp_cfg(2, 4, "fsdp"), tmp_path / "fsdp")
