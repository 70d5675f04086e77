"""Registration of the built-in methods. Each family module keeps its own code;
this file only lists them."""

from . import register
from .base import MethodSpec
from .lora import LoraConfig, apply_lora, export_lora_peft, merge_lora

register(MethodSpec(
    name="lora", config_cls=LoraConfig, apply=apply_lora,
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)",
    summary="Trains a low-rank update B·A beside frozen linear layers; mergeable.",
    trains="low-rank matrices A and B on the target linear layers",
    mergeable=True, merge=merge_lora, peft_export=export_lora_peft,
))
