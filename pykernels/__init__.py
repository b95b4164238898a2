"""pykernels: decode attention, LUT-GEMV and quantized-KV kernels for memory-bound LLM inference.

Importing never fails because an optional backend (the C++ extension, CUDA, Triton, cupy) is
missing; see ``pykernels.backends.status()`` for what is available and why.
"""
from . import backends
from .attention import decode_attention, merge_states
from .kv_cache import QuantizedKVCache
from .lut import LUTLinear, LUTWeight, lut_gemv, quantize_weight
from .plan import DecodePlan, plan_decode
from . import ops  # noqa: F401  (registers torch.ops.pykernels.*)

__version__ = "0.1.0"

__all__ = ["decode_attention", "merge_states", "plan_decode", "DecodePlan", "quantize_weight", "lut_gemv",
           "LUTWeight", "LUTLinear", "QuantizedKVCache", "backends", "__version__"]
