"""Which activation plan the `model` formula walks: the method's own
(`MethodSpec.plan`), or a stated lower bound for a method without one."""

from __future__ import annotations

from ..dims import ModelDims
from ..methods import get_method
from ..methods.plan import LayerPlan, Plan


def activation_plan(dims: ModelDims, method_cfg, task: str) -> Plan:
    """What each block trains, from the method's spec. A method without a plan
    gets a frozen model whose gradient reaches the first layer (a lower bound:
    its own tensors are missing), with a note saying so."""
    spec = get_method(method_cfg.name)
    if spec.plan is not None:
        return spec.plan(dims, method_cfg, task)
    plan = Plan(layers=[LayerPlan() for _ in range(dims.num_layers)], input_grad=True)
    plan.notes.append(f"hidden states for {spec.name!r} are modelled as a frozen model with gradients from the "
                      f"first layer on (its own extra tensors are not modelled yet)")
    return plan
