"""Roofline columns for benchmark rows: attainable time, efficiency and bound (issue 5).

Every timed row already carries the bytes it is credited with (and, for attention and LUT rows,
its FLOPs); this module places that cost on the machine of the run with ``roofline.place``:

- ``attainable_ms``: the roofline time of the row's cost, ``max(flops / peak(dtype),
  bytes / read bandwidth)``;
- ``efficiency``: ``attainable_ms / median_ms`` (1 at the roof);
- ``bound``: ``"memory"`` or ``"compute"``, whichever roof sets ``attainable_ms``.

The machine (:func:`machine_for_run`) takes its compute peaks from ``roofline.probe(quick=True)``
(cached per machine) but its memory bandwidth from the ``probe_memory_bandwidth()`` figures of the
same run, so for a memory-bound row ``efficiency == pct_bw / 100`` exactly: "% bw" and the
roofline never disagree about the machine.

Example
-------
>>> from roofline import MachineProfile
>>> m = MachineProfile("toy", {"bf16": 1e12}, {"read": 1e10, "copy": 1e10, "triad": 1e10})
>>> r = annotate({"median_ms": 2.0}, 1e6, 1e7, "bf16", m)
>>> round(r["attainable_ms"], 3), round(r["efficiency"], 3), r["bound"]
(1.0, 0.5, 'memory')
"""

from __future__ import annotations

import copy

from roofline.cost import Cost
from roofline.hardware import MachineProfile
from roofline.place import place, roof_dtype as compute_dtype

__all__ = ["machine_for_run", "run_machine", "annotate", "compute_dtype"]

# probe_memory_bandwidth() key -> MachineProfile.mem_bandwidth key; "bandwidth_GB_s" (the read
# median, the figure "% bw" divides by) wins over "read_GB_s" should the two ever differ
_BW_KEYS = (("read", ("bandwidth_GB_s", "read_GB_s")), ("copy", ("copy_GB_s",)),
            ("triad", ("triad_GB_s",)), ("read_1thread", ("read_1thread_GB_s",)))


def machine_for_run(probe: dict | None, bandwidth_GB_s: float | None = None) -> MachineProfile:
    """The run's machine: measured compute peaks, the run's own memory bandwidth.

    Parameters
    ----------
    probe : dict or None
        The ``roofline.probe_memory_bandwidth()`` result of this run. Its read figure replaces
        ``mem_bandwidth["read"]`` (and ``copy_GB_s`` / ``triad_GB_s`` replace copy / triad
        where present).
    bandwidth_GB_s : float, optional
        Read bandwidth to use when ``probe`` has none (``pykernels-bench --bandwidth``), so the
        roof is the figure "% bw" divides by.

    Raises whatever ``roofline.probe`` raises; :func:`run_machine` is the never-failing form.
    """
    import roofline  # the attribute roofline.probe is the probe function (see roofline/__init__)

    base = roofline.probe(device="cpu", quick=True)  # cached per machine; ~1 s when not
    m = copy.deepcopy(base)
    given = []
    for key, names in _BW_KEYS:
        val = next((probe[n] for n in names if probe and probe.get(n)), None)
        if val is None and key == "read" and bandwidth_GB_s:
            val = bandwidth_GB_s
        if val is not None:
            m.mem_bandwidth[key] = float(val) * 1e9
            given.append(f"{key} {float(val):.1f} GB/s")
    src = "this run's probe_memory_bandwidth()" if probe else "the given --bandwidth"
    m.notes = (m.notes + "; " if m.notes else "") + (
        f"memory bandwidth from {src}: {', '.join(given)}" if given
        else "memory bandwidth from roofline.probe(quick=True)")
    return m


def run_machine(probe: dict | None, bandwidth_GB_s: float | None = None
                ) -> tuple[MachineProfile | None, str | None]:
    """``(machine, None)``, or ``(None, why)`` when it cannot be built: the benchmark goes on
    without roofline columns rather than fail over them."""
    try:
        return machine_for_run(probe, bandwidth_GB_s), None
    except Exception as e:  # any probe failure: no roofline columns, never a crashed benchmark
        return None, f"no roofline columns: roofline.probe(quick=True) failed ({type(e).__name__}: {e})"


def annotate(row: dict, flops: float, nbytes: float, dtype: str,
             machine: MachineProfile | None) -> dict:
    """Add ``attainable_ms``, ``efficiency`` and ``bound`` to a timed ``row`` (in place).

    ``flops`` and ``nbytes`` are the row's own counts (the bytes its GB/s is credited with).
    Rows without a median or a machine are left as they are; a cost the roofline cannot place
    gets ``roofline_note`` instead of the columns.
    """
    if machine is None or not row.get("median_ms"):
        return row
    try:
        cost = Cost(float(flops), float(nbytes), compute_dtype(dtype, machine),
                    name=str(row.get("method", "")))
        p = place(cost, row["median_ms"] / 1e3, machine)
    except (ValueError, TypeError) as e:
        row["roofline_note"] = f"{type(e).__name__}: {e}"
        return row
    row.update({"attainable_ms": p.attainable_seconds * 1e3, "efficiency": p.efficiency,
                "bound": p.bound, "roof_dtype": cost.dtype})
    return row
