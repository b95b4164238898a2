"""Roofline tools: machine probe (this issue); cost models, placement and reports come later.

Depends only on numpy and torch; never imports ``pykernels``, ``offload`` or ``bench``.
"""

from .probe import CpuLoadMeter, llc_bytes, machine_info, probe_memory_bandwidth

__all__ = ["probe_memory_bandwidth", "machine_info", "llc_bytes", "CpuLoadMeter"]
