"""Pure-torch references: the test oracle and ``backend="reference"``."""
from .attention import decode_attention_reference, gather_kv, merge_states_reference
from .kv_attention import decode_attention_kv_reference
from .lut_gemv import lut_gemv_reference

__all__ = ["decode_attention_reference", "decode_attention_kv_reference", "gather_kv", "merge_states_reference",
           "lut_gemv_reference"]
