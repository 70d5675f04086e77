"""Registers the bottleneck-adapter and prompt methods: houlsby, parallel_adapter,
prompt_tuning, p_tuning, prefix_tuning, llama_adapter, mam, s4."""

from . import register
from .base import MethodSpec
from .bottleneck import (HoulsbyConfig, ParallelAdapterConfig, apply_houlsby, apply_parallel_adapter, count_houlsby,
                         count_parallel_adapter)
from .llama_adapter import LlamaAdapterConfig, apply_llama_adapter, count_llama_adapter
from .mam import MamConfig, apply_mam, count_mam
from .prefix import PrefixTuningConfig, apply_prefix_tuning, count_prefix_tuning, export_prefix_peft, load_prefix_state
from .prompts import (PromptTuningConfig, PTuningConfig, apply_p_tuning, apply_prompt_tuning, count_p_tuning,
                      count_prompt_tuning, export_p_tuning_peft, export_prompt_tuning_peft, load_prompt_state)
from .s4 import S4Config, apply_s4, count_s4

register(MethodSpec(
    name="houlsby", config_cls=HoulsbyConfig, apply=apply_houlsby,
    paper="Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (arXiv:1902.00751)",
    summary="Serial bottleneck adapters after attention and after the FFN, near-identity init.",
    trains="bottleneck adapters (down, up projections with biases) and, by default, the blocks' layer norms",
    count_trainable=count_houlsby,
))

register(MethodSpec(
    name="parallel_adapter", config_cls=ParallelAdapterConfig, apply=apply_parallel_adapter,
    paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366)",
    summary="A scaled bottleneck adapter computed from the FFN (or attention) input, added beside it.",
    trains="bottleneck adapters beside the FFN and/or attention",
    count_trainable=count_parallel_adapter,
))

register(MethodSpec(
    name="prompt_tuning", config_cls=PromptTuningConfig, apply=apply_prompt_tuning,
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning (arXiv:2104.08691)",
    summary="N trainable virtual-token embeddings prepended to the input embeddings.",
    trains="the soft-prompt embeddings (num_virtual_tokens x hidden)",
    peft_export=export_prompt_tuning_peft, count_trainable=count_prompt_tuning, load_state=load_prompt_state,
))

register(MethodSpec(
    name="p_tuning", config_cls=PTuningConfig, apply=apply_p_tuning,
    paper="Liu et al. 2021, GPT Understands, Too (arXiv:2103.10385)",
    summary="Virtual tokens produced by a trainable MLP or bi-LSTM prompt encoder; folded for saving.",
    trains="the prompt encoder's input embeddings and its MLP / LSTM",
    peft_export=export_p_tuning_peft, count_trainable=count_p_tuning, load_state=load_prompt_state,
))

register(MethodSpec(
    name="prefix_tuning", config_cls=PrefixTuningConfig, apply=apply_prefix_tuning,
    paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation (arXiv:2101.00190)",
    summary="Trainable key/value prefixes in every attention layer (through the KV cache); MLP folded for saving.",
    trains="the prefix embeddings and their MLP reparameterisation (saved folded: N x layers*2*kv_heads*head_dim)",
    peft_export=export_prefix_peft, count_trainable=count_prefix_tuning, load_state=load_prefix_state,
))

register(MethodSpec(
    name="llama_adapter", config_cls=LlamaAdapterConfig, apply=apply_llama_adapter,
    paper="Zhang et al. 2023, LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention "
          "(arXiv:2303.16199)",
    summary="Adaption prompts in the top L layers, joined through zero-initialised per-head gates (Llama only).",
    trains="per-layer adaption prompts (adapter_len x hidden) and gates (one per head)",
    count_trainable=count_llama_adapter,
))

register(MethodSpec(
    name="mam", config_cls=MamConfig, apply=apply_mam,
    paper="He et al. 2022, Towards a Unified View of Parameter-Efficient Transfer Learning (arXiv:2110.04366), "
          "Mix-And-Match adapter",
    summary="Prefix tuning on attention plus a scaled parallel adapter beside the FFN.",
    trains="prefixes (with their MLP) and parallel FFN adapters",
    count_trainable=count_mam,
))

register(MethodSpec(
    name="s4", config_cls=S4Config, apply=apply_s4,
    paper="Chen et al. 2023, Parameter-Efficient Fine-Tuning Design Spaces (arXiv:2301.01821)",
    summary="Layers in 4 groups (spindle by default), each with its own mix of Adapter, Prefix, BitFit and LoRA.",
    trains="per group: adapters, prefixes, LoRA on query/value, biases (added zero biases on Llama)",
    count_trainable=count_s4,
))
