"""Registration of the built-in methods. Each family module keeps its own code;
the two registry modules below only list them."""

from . import registry_lora_family  # noqa: F401  lora, dora, adalora, qlora, ia3, bitfit, ln_tuning, full, top_k
from . import registry_adapters_prompts  # noqa: F401  houlsby, parallel_adapter, prompt/p/prefix tuning, llama_adapter, mam, s4
