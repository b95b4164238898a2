"""Machine profiles and a table of theoretical accelerator peaks.

A :class:`MachineProfile` holds the roofs a cost is placed against: peak FLOP/s per dtype, memory
bandwidth in bytes/s, memory capacity in bytes, disk and interconnect bandwidths in bytes/s.
``source`` says where the figures come from: ``"table"`` (vendor datasheets, below) or
``"measured"`` (a probe).

Conventions of the table (``HARDWARE``):

- FLOP/s are *dense* tensor-core peaks (the datasheets' "with sparsity" figures halved away).
  ``"fp32"`` is the non-tensor FP32 rate; ``"tf32"`` is the dense TF32 tensor rate.
- Memory bandwidth is the datasheet HBM/GDDR figure, used for ``"read"``, ``"copy"`` and
  ``"triad"`` alike (a table cannot tell them apart; a probe does).
- Memory capacity: the datasheet "GB" of GPU memory is binary (HBM stacks and GDDR chips come in
  GiB; ``nvidia-smi`` reports an A100-80GB as 81920 MiB), so ``80GB`` is stored as ``80 * 2**30``
  bytes. ECC and driver reservations are not subtracted.
- Host links (``h2d_pinned``, ``d2h_pinned``) are the *effective* pinned-memory copy rate, taken
  as 80% of the raw per-direction PCIe x16 rate (128b/130b encoding): about 25.2e9 B/s on gen4
  and 50.4e9 B/s on gen5, which is what ``cudaMemcpy`` from pinned memory typically reaches.
- GPU-GPU links (``nvlink``, ``xgmi``, ``pcie_p2p``) are *per-direction* bytes/s (datasheets
  quote bidirectional totals), the figure a ring all-reduce is limited by.

Example
-------
>>> from roofline.hardware import get_machine
>>> get_machine("A100-80GB-SXM").peak("bf16")
312000000000000.0
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

__all__ = ["MachineProfile", "HARDWARE", "GPU_SM_COUNT", "DECODE_CTAS_PER_SM", "get_machine", "decode_workers"]

_GiB = float(1 << 30)


@dataclass
class MachineProfile:
    """Roofs of one machine (one device plus its links).

    Attributes
    ----------
    name : str
        Machine name, e.g. ``"A100-80GB-SXM"``.
    peak_flops : dict[str, float]
        dtype name (``"fp32"``, ``"tf32"``, ``"fp16"``, ``"bf16"``, ``"int8"``, ``"fp8"``) -> FLOP/s
        (OP/s for int8).
    mem_bandwidth : dict[str, float]
        ``{"read", "copy", "triad"}`` -> bytes/s; a CPU probe adds ``"read_1thread"`` (what
        one thread's bare read loop streams).
    mem_capacity : float or None
        Device memory in bytes; None when unknown.
    disk : dict[str, dict]
        Directory path -> ``{"read": bytes/s, "write": bytes/s}``.
    links : dict[str, float]
        Link name -> bytes/s, e.g. ``"h2d_pinned"``, ``"d2h_pinned"``, ``"nvlink"``,
        ``"disk_read"``.
    source : str
        ``"table"`` or ``"measured"``.
    notes : str
        Free text: assumptions, sources.
    caches : dict[str, float]
        Cache name (``"L1d"``, ``"L2"``, ``"L3"``) -> bytes per instance (a probe fills it;
        empty for table entries).

    Example
    -------
    >>> m = MachineProfile("toy", {"bf16": 1e12}, {"read": 1e11, "copy": 1e11, "triad": 1e11})
    >>> MachineProfile.from_dict(m.to_dict()) == m
    True
    """

    name: str
    peak_flops: dict[str, float]
    mem_bandwidth: dict[str, float]
    mem_capacity: float | None = None
    disk: dict[str, dict] = field(default_factory=dict)
    links: dict[str, float] = field(default_factory=dict)
    source: str = "table"
    notes: str = ""
    caches: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        """Roofs are rates: every peak, bandwidth and link a finite number > 0 (a 0 would divide
        every placement by zero; leave a figure out instead)."""
        for what, d in (("peak_flops", self.peak_flops), ("mem_bandwidth", self.mem_bandwidth),
                        ("links", self.links)):
            if not isinstance(d, dict):
                raise TypeError(f"{what}: expected a dict, got {type(d).__name__}")
            for k, v in d.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    raise ValueError(f"{what}[{k!r}]: expected a finite rate > 0, got {v!r}")
        if self.mem_capacity is not None and not (isinstance(self.mem_capacity, (int, float))
                                                  and math.isfinite(self.mem_capacity) and self.mem_capacity > 0):
            raise ValueError(f"mem_capacity: expected bytes > 0 or None, got {self.mem_capacity!r}")

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; ValueError naming the known dtypes if absent."""
        try:
            return float(self.peak_flops[dtype])
        except KeyError:
            raise ValueError(f"dtype: {dtype!r} has no peak on {self.name!r}; "
                             f"known: {sorted(self.peak_flops)}") from None

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict (``from_dict`` inverts it exactly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MachineProfile":
        """Inverse of :meth:`to_dict`."""
        return cls(**copy.deepcopy(d))


def _pcie_x16(gen: int) -> float:
    """Effective pinned copy rate in bytes/s: 80% of the raw per-direction x16 rate."""
    gt_per_s = {4: 16e9, 5: 32e9}[gen]
    return 0.8 * gt_per_s * 16 * (128 / 130) / 8


def _gpu(name, flops, bw, cap_gib, pcie_gen, notes, **gpu_links) -> MachineProfile:
    host = _pcie_x16(pcie_gen)
    links = {"h2d_pinned": host, "d2h_pinned": host, **gpu_links}
    return MachineProfile(name=name, peak_flops={k: float(v) for k, v in flops.items()},
                          mem_bandwidth={"read": bw, "copy": bw, "triad": bw},
                          mem_capacity=cap_gib * _GiB, links=links, source="table",
                          notes=f"{notes}; PCIe gen{pcie_gen} x16 host link at 80% of raw")


HARDWARE: dict[str, MachineProfile] = {p.name: p for p in [
    # NVIDIA A100 Tensor Core GPU datasheet (2021): FP32 19.5 TF, TF32 156 TF, BF16/FP16 312 TF,
    # INT8 624 TOPS (dense); 40GB HBM2 1,555 GB/s; NVLink 600 GB/s bidirectional; PCIe gen4.
    _gpu("A100-40GB-SXM", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12,
                           "int8": 624e12}, 1.555e12, 40, 4, "NVIDIA A100 datasheet",
         nvlink=300e9),
    # Same datasheet, 80GB SXM: HBM2e 2,039 GB/s.
    _gpu("A100-80GB-SXM", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12,
                           "int8": 624e12}, 2.039e12, 80, 4, "NVIDIA A100 datasheet",
         nvlink=300e9),
    # NVIDIA H100 Tensor Core GPU datasheet, SXM: FP32 67 TF, TF32 494.5, BF16/FP16 989.5,
    # FP8/INT8 1,979 (dense = half the sparse figures); 80GB HBM3 3.35 TB/s; NVLink 900 GB/s
    # bidirectional; PCIe gen5.
    _gpu("H100-SXM", {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12,
                      "fp8": 1979e12, "int8": 1979e12}, 3.35e12, 80, 5, "NVIDIA H100 datasheet",
         nvlink=450e9),
    # Same datasheet, PCIe: FP32 51 TF, TF32 378, BF16/FP16 756.5, FP8/INT8 1,513 (dense);
    # 80GB HBM2e 2.0 TB/s; NVLink bridge 600 GB/s bidirectional (GPU pairs only).
    _gpu("H100-PCIe", {"fp32": 51e12, "tf32": 378e12, "bf16": 756.5e12, "fp16": 756.5e12,
                       "fp8": 1513e12, "int8": 1513e12}, 2.0e12, 80, 5, "NVIDIA H100 datasheet",
         nvlink=300e9),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM: compute as H100 SXM; 141GB HBM3e 4.8 TB/s;
    # NVLink 900 GB/s bidirectional; PCIe gen5.
    _gpu("H200-SXM", {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12,
                      "fp8": 1979e12, "int8": 1979e12}, 4.8e12, 141, 5, "NVIDIA H200 datasheet",
         nvlink=450e9),
    # NVIDIA L4 datasheet: FP32 30.3 TF; TF32 120, BF16/FP16 242, FP8/INT8 485 are sparse
    # figures, halved here; 24GB GDDR6 300 GB/s; PCIe gen4, no NVLink.
    _gpu("L4", {"fp32": 30.3e12, "tf32": 60e12, "bf16": 121e12, "fp16": 121e12,
                "fp8": 242.5e12, "int8": 242.5e12}, 300e9, 24, 4, "NVIDIA L4 datasheet",
         pcie_p2p=_pcie_x16(4)),
    # NVIDIA L40S datasheet: FP32 91.6 TF, TF32 183, BF16/FP16 362.05, FP8/INT8 733 (dense);
    # 48GB GDDR6 864 GB/s; PCIe gen4, no NVLink.
    _gpu("L40S", {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362.05e12, "fp16": 362.05e12,
                  "fp8": 733e12, "int8": 733e12}, 864e9, 48, 4, "NVIDIA L40S datasheet",
         pcie_p2p=_pcie_x16(4)),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP32 82.6 TF, TF32 82.6;
    # FP16/BF16 tensor with FP32 accumulate 165.2 TF, FP8 (FP32 acc.) 330.3, INT8 660.6 TOPS
    # (dense); 24GB GDDR6X 1,008 GB/s; PCIe gen4; no NVLink and no peer-to-peer, so no GPU-GPU
    # link is listed.
    _gpu("RTX-4090", {"fp32": 82.6e12, "tf32": 82.6e12, "bf16": 165.2e12, "fp16": 165.2e12,
                      "fp8": 330.3e12, "int8": 660.6e12}, 1.008e12, 24, 4,
         "NVIDIA Ada architecture whitepaper; FP32-accumulate tensor rates"),
    # AMD Instinct MI300X data sheet: FP32 163.4 TF, TF32 653.7, BF16/FP16 1,307.4, FP8/INT8
    # 2,614.9 (dense); 192GB HBM3 5.3 TB/s; Infinity Fabric 896 GB/s aggregate bidirectional
    # peer bandwidth (7 links); PCIe gen5.
    _gpu("MI300X", {"fp32": 163.4e12, "tf32": 653.7e12, "bf16": 1307.4e12, "fp16": 1307.4e12,
                    "fp8": 2614.9e12, "int8": 2614.9e12}, 5.3e12, 192, 5,
         "AMD Instinct MI300X data sheet", xgmi=448e9),
]}


def get_machine(machine: str | MachineProfile) -> MachineProfile:
    """A copy of the ``HARDWARE`` entry ``machine``, or ``machine`` itself if it is a profile.

    Example
    -------
    >>> get_machine("H100-SXM").mem_bandwidth["read"]
    3350000000000.0
    """
    if isinstance(machine, MachineProfile):
        return machine
    if isinstance(machine, str) and machine in HARDWARE:
        return copy.deepcopy(HARDWARE[machine])  # callers may edit it; the table stays as cited
    raise ValueError(f"machine: expected a MachineProfile or one of {sorted(HARDWARE)}, "
                     f"got {machine!r}")


# Streaming multiprocessors (AMD: compute units) of the table's GPUs: the NVIDIA A100 (GA100, 108
# SMs) and H100 (GH100: 132 SMs SXM5, 114 PCIe) architecture whitepapers, H200 (same GH100 die as
# the H100 SXM, 132), the Ada whitepaper (L4 AD104 58, L40S AD102 142, RTX 4090 AD102 128) and
# the AMD CDNA 3 white paper (MI300X 304 CUs). The decode-attention model needs the worker count.
GPU_SM_COUNT: dict[str, int] = {
    "A100-40GB-SXM": 108, "A100-80GB-SXM": 108, "H100-SXM": 132, "H100-PCIe": 114, "H200-SXM": 132,
    "L4": 58, "L40S": 142, "RTX-4090": 128, "MI300X": 304,
}
assert set(GPU_SM_COUNT) == {n for n, p in HARDWARE.items() if "h2d_pinned" in p.links}

#: decode-attention workers (CTAs / Triton programs) pykernels launches per SM on a GPU
DECODE_CTAS_PER_SM = 2


def decode_workers(machine: str | MachineProfile, cpu_threads: int | None = None) -> tuple[str, int]:
    """``(device, num_workers)`` of decode attention on ``machine``, for the schedule model.

    A GPU of the table: ``("cuda", DECODE_CTAS_PER_SM * SMs)``, the CTA count ``pykernels``
    launches. A measured GPU profile (it has a
    ``h2d_pinned`` link): the SM count of the CUDA device torch sees, else ValueError. Any other
    machine is a CPU: ``("cpu", cpu_threads or os.cpu_count())``.

    >>> decode_workers("H100-SXM")
    ('cuda', 264)
    """
    import os

    p = get_machine(machine)
    if p.name in GPU_SM_COUNT:
        return "cuda", DECODE_CTAS_PER_SM * GPU_SM_COUNT[p.name]
    if "h2d_pinned" in p.links:  # a probe(device="cuda") profile
        try:
            import torch

            if torch.cuda.is_available():
                return "cuda", DECODE_CTAS_PER_SM * torch.cuda.get_device_properties(0).multi_processor_count
        except ImportError:
            pass
        raise ValueError(f"machine: {p.name!r} is a GPU profile, but no CUDA device is visible to "
                         "count its SMs; name a table GPU instead (one of "
                         f"{sorted(GPU_SM_COUNT)})")
    return "cpu", int(cpu_threads or os.cpu_count() or 1)
