"""Registers the LoRA family (lora, dora, adalora, qlora, ia3) and the baselines
(bitfit, ln_tuning, full, top_k)."""

from . import register
from .base import MethodSpec
from .adalora import (AdaLoraConfig, adalora_after_backward, adalora_after_step, apply_adalora,
                      count_adalora_trainable, merge_adalora, orthogonal_regularization)
from .baselines import (BitFitConfig, FullConfig, LnTuningConfig, TopKConfig, apply_bitfit, apply_full,
                        apply_ln_tuning, apply_top_k, count_bitfit, count_full, count_ln_tuning, count_top_k,
                        no_merge)
from .dora import DoraConfig, apply_dora, count_dora_trainable, export_dora_peft
from .ia3 import IA3Config, apply_ia3, count_ia3_trainable, export_ia3_peft, merge_ia3
from .lora import LoraConfig, apply_lora, count_lora_trainable, export_lora_peft, merge_lora
from .qlora import QLoraConfig, apply_qlora, count_qlora_trainable, export_qlora_peft, merge_qlora

register(MethodSpec(
    name="lora", config_cls=LoraConfig, apply=apply_lora,
    paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models (arXiv:2106.09685)",
    summary="Trains a low-rank update B·A beside frozen linear layers (rsLoRA, PiSSA, per-module and "
            "random ranks); mergeable.",
    trains="low-rank matrices A and B on the target linear layers",
    mergeable=True, merge=merge_lora, peft_export=export_lora_peft, count_trainable=count_lora_trainable,
))

register(MethodSpec(
    name="dora", config_cls=DoraConfig, apply=apply_dora,
    paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)",
    summary="LoRA on the direction of each weight plus a learned magnitude vector; mergeable.",
    trains="A, B and a magnitude per output feature on the target linear layers",
    mergeable=True, merge=merge_lora, peft_export=export_dora_peft, count_trainable=count_dora_trainable,
))

register(MethodSpec(
    name="adalora", config_cls=AdaLoraConfig, apply=apply_adalora,
    paper="Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning "
          "(arXiv:2303.10512)",
    summary="SVD-form low-rank updates whose rank budget is re-allocated by importance during training.",
    trains="P, Λ, Q of each target layer (singular values masked to the budget)",
    mergeable=True, merge=merge_adalora, count_trainable=count_adalora_trainable,
    extra_loss=orthogonal_regularization, after_backward=adalora_after_backward, after_step=adalora_after_step,
))

register(MethodSpec(
    name="qlora", config_cls=QLoraConfig, apply=apply_qlora,
    paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314)",
    summary="LoRA over a base whose linear weights are stored as 4-bit NF4 (double-quantized constants).",
    trains="low-rank matrices A and B; the NF4 base stays frozen",
    mergeable=True, merge=merge_qlora, peft_export=export_qlora_peft, count_trainable=count_qlora_trainable,
))

register(MethodSpec(
    name="ia3", config_cls=IA3Config, apply=apply_ia3,
    paper="Liu et al. 2022, Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
          "Learning (arXiv:2205.05638)",
    summary="Learned vectors rescale keys, values and the FFN intermediate activation; mergeable.",
    trains="one scaling vector per target layer",
    mergeable=True, merge=merge_ia3, peft_export=export_ia3_peft, count_trainable=count_ia3_trainable,
))

register(MethodSpec(
    name="bitfit", config_cls=BitFitConfig, apply=apply_bitfit,
    paper="Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based Masked "
          "Language-models (arXiv:2106.10199)",
    summary="Trains only the bias terms (models without biases, like Llama, are refused).",
    trains="bias vectors", mergeable=True, merge=no_merge, count_trainable=count_bitfit,
))

register(MethodSpec(
    name="ln_tuning", config_cls=LnTuningConfig, apply=apply_ln_tuning,
    paper="Zhao et al. 2024, Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning "
          "(arXiv:2312.11420)",
    summary="Trains only the normalization layers.",
    trains="LayerNorm / RMSNorm weights and biases", mergeable=True, merge=no_merge, count_trainable=count_ln_tuning,
))

register(MethodSpec(
    name="full", config_cls=FullConfig, apply=apply_full,
    paper="Full fine-tuning (baseline; e.g. Devlin et al. 2019, BERT, arXiv:1810.04805)",
    summary="Trains every weight: the reference point for quality and cost.",
    trains="every parameter", mergeable=True, merge=no_merge, trains_head=False, count_trainable=count_full,
))

register(MethodSpec(
    name="top_k", config_cls=TopKConfig, apply=apply_top_k,
    paper="Lee et al. 2019, What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning (arXiv:1911.03090)",
    summary="Trains the last k blocks and the final norm; everything below stays frozen.",
    trains="the last k transformer blocks", mergeable=True, merge=no_merge, count_trainable=count_top_k,
))
