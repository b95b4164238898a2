"""Place a measured run on a machine's roofline.

The roofline time of a :class:`~roofline.cost.Cost` is the largest of its compute time
(``flops / peak(dtype)``), memory time (``bytes / bandwidth``) and the time of each link it uses
(``link_bytes[name] / links[name]``): the roofs are assumed to overlap perfectly, so the slowest
one bounds the run.

Example
-------
>>> from roofline.cost import gemm_cost
>>> p = place(gemm_cost(1, 4096, 4096), 20e-6, "A100-80GB-SXM")
>>> p.bound, round(p.efficiency, 3)
('memory', 0.823)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .cost import Cost
from .hardware import MachineProfile, get_machine

__all__ = ["Point", "place", "roofline_time", "roof_dtype"]


def roof_dtype(dtype: str, machine: str | MachineProfile) -> str:
    """The compute roof a run in ``dtype`` is placed under: its own peak, else (fp16 on a CPU
    without a native fp16 GEMM, where a probe lists no fp16 peak) the bf16 roof, the other
    16-bit rate; any other missing dtype is returned as is (``place`` then names the known ones).

    Example
    -------
    >>> from roofline.hardware import MachineProfile
    >>> roof_dtype("fp16", MachineProfile("cpu", {"bf16": 1e12}, {"read": 1e10}))
    'bf16'
    """
    peaks = get_machine(machine).peak_flops
    if dtype not in peaks and dtype == "fp16" and "bf16" in peaks:
        return "bf16"
    return dtype


def roofline_time(cost: Cost, machine: str | MachineProfile,
                  bandwidth: str = "read") -> tuple[float, str]:
    """Attainable seconds of ``cost`` on ``machine`` and its bound.

    Returns ``(seconds, bound)`` with bound ``"compute"``, ``"memory"`` or ``"link:<name>"``;
    ties go to the first of memory, compute, links (in ``cost.link_bytes`` order).

    Example
    -------
    >>> from roofline.cost import transfer_cost
    >>> t, bound = roofline_time(transfer_cost(1e9, "h2d_pinned"), "A100-80GB-SXM")
    >>> round(t * 1e3, 1), bound         # 1 GB over PCIe gen4 at ~25.2 GB/s
    (39.7, 'link:h2d_pinned')
    """
    m = get_machine(machine)
    if bandwidth not in m.mem_bandwidth:
        raise ValueError(f"bandwidth: expected one of {sorted(m.mem_bandwidth)}, got {bandwidth!r}")
    times = [("memory", cost.bytes / m.mem_bandwidth[bandwidth]),
             ("compute", cost.flops / m.peak(cost.dtype) if cost.flops else 0.0)]
    for link, nbytes in cost.link_bytes.items():
        if link not in m.links:
            raise ValueError(f"link: {link!r} is not in the links of {m.name!r} "
                             f"({sorted(m.links)}); add its bandwidth in bytes/s")
        times.append((f"link:{link}", nbytes / m.links[link]))
    bound, seconds = times[0][0], times[0][1]
    for name, t in times[1:]:
        if t > seconds:
            bound, seconds = name, t
    if seconds <= 0:
        raise ValueError(f"cost: {cost.name or 'cost'} has no FLOPs, bytes or link bytes")
    return seconds, bound


@dataclass
class Point:
    """One measured run against the roofline (FLOP/s, bytes/s, seconds).

    ``intensity`` is FLOPs per device-memory byte (inf when no bytes); ``attainable_flops`` is
    ``min(peak, intensity * bandwidth)``; ``attainable_seconds`` the roofline time of the cost;
    ``efficiency = attainable_seconds / seconds`` (1 at the roof, above 1 means the model's
    roofs are too low for this run).
    """

    name: str
    flops: float
    bytes: float
    seconds: float
    intensity: float
    achieved_flops: float
    achieved_bw: float
    attainable_flops: float
    attainable_seconds: float
    bound: str
    efficiency: float
    dtype: str
    machine: str

    def to_dict(self) -> dict:
        """JSON-ready dict (an infinite intensity becomes None)."""
        d = asdict(self)
        if math.isinf(d["intensity"]):
            d["intensity"] = None
        return d


def place(cost: Cost, seconds: float, machine: str | MachineProfile,
          bandwidth: str = "read") -> Point:
    """Place a run of ``cost`` that took ``seconds`` on ``machine``'s roofline.

    Parameters
    ----------
    cost : Cost
        FLOPs, bytes and link bytes of the run (see :mod:`roofline.cost`).
    seconds : float
        Measured wall time of the run, > 0.
    machine : str or MachineProfile
        A ``HARDWARE`` name or a profile.
    bandwidth : str
        Which ``mem_bandwidth`` entry is the memory roof (``"read"``, ``"copy"``, ``"triad"``).

    Example
    -------
    >>> from roofline.cost import decode_attention_cost
    >>> p = place(decode_attention_cost(8, 4096, 32, 8, 128), 1e-4, "H100-SXM")
    >>> p.bound
    'memory'
    """
    if not isinstance(cost, Cost):
        raise TypeError(f"cost: expected a roofline.cost.Cost, got {type(cost).__name__}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds: expected a finite number > 0, got {seconds!r}")
    if not (math.isfinite(cost.flops / seconds) and math.isfinite(cost.bytes / seconds)):
        raise ValueError(f"seconds: {seconds!r} makes the achieved rate infinite (a broken timing)")
    m = get_machine(machine)
    t, bound = roofline_time(cost, m, bandwidth)
    peak = m.peak(cost.dtype) if cost.flops else 0.0
    bw = m.mem_bandwidth[bandwidth]
    intensity = cost.flops / cost.bytes if cost.bytes else math.inf
    attainable = min(peak, intensity * bw) if cost.flops else 0.0
    return Point(name=cost.name, flops=cost.flops, bytes=cost.bytes, seconds=float(seconds),
                 intensity=intensity, achieved_flops=cost.flops / seconds,
                 achieved_bw=cost.bytes / seconds, attainable_flops=attainable,
                 attainable_seconds=t, bound=bound, efficiency=t / seconds, dtype=cost.dtype,
                 machine=m.name)
