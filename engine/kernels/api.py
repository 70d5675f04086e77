"""The Triton kernels' entry points. Importing this module imports triton and
defines the kernels (compiled, or interpreted under TRITON_INTERPRET=1): reach it
through `engine.kernels.ops()` after `engine.kernels.applies(...)`."""

from .nf4_dequant import nf4_dequantize
from .rms_norm import rms_norm
from .rope import rope
from .swiglu import swiglu
from .xent import softmax_xent_

__all__ = ["nf4_dequantize", "rms_norm", "rope", "swiglu", "softmax_xent_"]
