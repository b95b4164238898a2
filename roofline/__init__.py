"""Roofline tools: machine probe, hardware table, cost models, placement, model analysis and reports.

Depends only on numpy and torch; never imports ``pykernels``, ``offload`` or ``bench``.
"""

from .cost import (Cost, decode_attention_cost, decode_attention_kv_cost, gemm_cost,
                   kv_bytes_per_token, lut_gemv_cost, prefill_attention_cost, transfer_cost)
from .hardware import HARDWARE, MachineProfile, get_machine
from .model import ModelAnalysis, analyze_model
from .place import Point, place, roofline_time
from .probe import CpuLoadMeter, llc_bytes, machine_info, probe_memory_bandwidth
# After the submodule import above: the attribute ``roofline.probe`` is the function (the
# issue's ``roofline.probe(device=...)``); ``from roofline.probe import X`` still reaches the
# module through sys.modules.
from .measure import cache_dir, gpu_identity, probe, probe_disk  # noqa: E402
# Likewise ``roofline.report`` is the function; the module is ``roofline.report`` in sys.modules.
from .report import report  # noqa: E402

__all__ = ["probe_memory_bandwidth", "machine_info", "llc_bytes", "CpuLoadMeter",
           "MachineProfile", "HARDWARE", "get_machine",
           "Cost", "kv_bytes_per_token", "decode_attention_cost", "decode_attention_kv_cost",
           "prefill_attention_cost", "lut_gemv_cost", "gemm_cost", "transfer_cost",
           "Point", "place", "roofline_time", "ModelAnalysis", "analyze_model",
           "probe", "probe_disk", "gpu_identity", "cache_dir", "report"]
