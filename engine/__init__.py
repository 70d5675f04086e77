"""PEFT Studio engine: PEFT methods, training loop, memory estimator, model/data
loading and adapter import/export.

Depends only on torch, transformers, datasets and safetensors; it knows nothing
about databases, queues or UIs.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
