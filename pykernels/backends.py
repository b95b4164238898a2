"""Backend registry: which implementation serves a call, and why the others declined.

Each backend declares the devices it runs on and an availability check that never raises.
``backend="auto"`` takes the first backend, in the order below, that is available and accepts
the call, unless several can and a measured autotune result (``roofline.autotune``) names the
fastest for the call's shape bucket; the CPU path never falls back to the slow pure-torch
reference silently (ask for it with ``backend="reference"``). An explicit backend that cannot serve raises
``NotImplementedError`` listing every backend's reason.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.utils.dlpack import to_dlpack as _to_dlpack

BACKENDS = ("cuda", "triton", "cpu", "reference")


@dataclass
class Backend:
    name: str
    devices: tuple
    probe: Callable[[], tuple]          # () -> (available: bool, reason: str); never raises
    auto: bool = True                   # may backend="auto" pick it?
    _status: Optional[tuple] = field(default=None, repr=False)

    def status(self) -> tuple:
        if self._status is None:
            try:
                self._status = self.probe()
            except Exception as e:  # a broken optional backend must not break the package
                self._status = (False, f"probe failed: {type(e).__name__}: {e}")
        return self._status


_cpu_lock = threading.Lock()
_cpu_threads_set = False


def cpu_module():
    """The compiled CPU extension, with its thread count synced to torch on first use."""
    global _cpu_threads_set
    from . import _C  # noqa: F401  (ImportError handled by the probe)

    if not _cpu_threads_set:
        from roofline.probe import env_threads

        with _cpu_lock:
            n = env_threads()  # a bad value is a ValueError naming the variable, never ignored
            _C.set_num_threads(torch.get_num_threads() if n is None else n)
            _cpu_threads_set = True
    return _C


def _probe_cpu():
    try:
        from . import _C
    except ImportError as e:
        return False, (f"pykernels._C is not built ({e}); reinstall with `pip install .` "
                       "(needs a C++17 compiler) or run `make test` in a checkout")
    return True, f"pykernels._C built; ISA {_C.active_isa()} (CPU supports {_C.detected_isa()})"


def _probe_triton():
    from .triton.decode_attention import available

    return available()


def _probe_cuda():
    from .cuda.decode_attention import available

    return available()


def _probe_reference():
    return True, "pure-torch reference (slow; only used when asked for with backend='reference')"


REGISTRY = {
    "cuda": Backend("cuda", ("cuda",), _probe_cuda),
    "triton": Backend("triton", ("cuda", "cpu"), _probe_triton),
    "cpu": Backend("cpu", ("cpu",), _probe_cpu),
    "reference": Backend("reference", ("cpu", "cuda"), _probe_reference, auto=False),
}


def _triton_interprets() -> bool:
    """True when the Triton kernels were decorated in interpreter mode (they can take CPU tensors)."""
    try:
        from .triton._runtime import INTERPRET
    except Exception:
        return False
    return bool(INTERPRET)


def dl(t):
    """A DLPack capsule of tensor ``t`` (anything else, None included, unchanged) for the compiled
    extensions (``pykernels._C``, ``pykernels._cuda``), which take capsules or objects with
    ``__dlpack__``: the capsule skips ``Tensor.__dlpack__``'s Python wrapper (about 2.5 us per
    tensor, five or six tensors per call; stream-neutral either way). The public layers have
    already checked and detached the tensors."""
    return _to_dlpack(t) if isinstance(t, torch.Tensor) else t


_MODULE_STATUS: dict = {}


def module_status(modname: str) -> tuple:
    """``(module or None, why not)`` of a kernel module (e.g. ``"pykernels.cuda.kv_attention"``):
    imported, and its ``available()`` (if it has one) true. Computed once per process, as the
    registry's backend status is: availability cannot change while a process runs, and asking
    again on every call cost ~150 us on a GPU host (``available()`` stats the file system for
    cupy and counts devices)."""
    hit = _MODULE_STATUS.get(modname)
    if hit is None:
        try:
            mod = importlib.import_module(modname)
        except Exception as e:  # a missing or broken optional backend is a reason, not a crash
            hit = (None, f"{modname} cannot be imported ({type(e).__name__}: {e})")
        else:
            avail = getattr(mod, "available", None)
            try:
                ok, why = avail() if callable(avail) else (True, "")
            except Exception as e:
                ok, why = False, f"{modname}.available() failed: {type(e).__name__}: {e}"
            hit = (mod, "") if ok else (None, why)
        _MODULE_STATUS[modname] = hit
    return hit


def status() -> dict:
    """{backend: (available, reason)} for every backend; never raises."""
    return {name: REGISTRY[name].status() for name in BACKENDS}


def _measured_first(candidates: list, measured: Optional[Callable[[], Optional[dict]]]) -> str:
    """The candidate measured fastest (``measured()`` gives a ``roofline.autotune`` entry whose
    timings are keyed by backend name), else the first in the static order."""
    if len(candidates) > 1 and measured is not None:
        try:
            entry = measured()
        except Exception:  # an unreadable autotune cache: the static order stands
            entry = None
        timed = [(entry["timings"][n], n) for n in candidates if entry and n in entry["timings"]]
        if timed:
            return min(timed)[1]
    return candidates[0]


def select(backend: str, device: torch.device, accepts: Callable[[str], Optional[str]],
           measured: Optional[Callable[[], Optional[dict]]] = None, order: Optional[tuple] = None) -> str:
    """Pick the backend for a call.

    ``accepts(name)`` returns None if the backend can serve this particular call, or the reason
    it cannot (dtype, head dim, ...). Returns the chosen backend name. Under ``"auto"``, when
    more than one backend can serve the call (CUDA and Triton on a GPU), ``measured()`` is
    consulted: a ``roofline.autotune`` entry for the call's shape bucket whose timings are keyed
    by backend name; the fastest measured backend wins, else the static order does. ``order``
    replaces that static order (default ``BACKENDS``) for an op whose measured ranking differs.
    """
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
    if order is not None and sorted(order) != sorted(BACKENDS):
        raise ValueError(f"order: expected a permutation of {BACKENDS}, got {order!r}")
    names = (order or BACKENDS) if backend == "auto" else (backend,)
    reasons, candidates = {}, []
    for name in names:
        b = REGISTRY[name]
        if device.type not in b.devices:
            ok, why = b.status()
            reasons[name] = f"runs on {'/'.join(b.devices)}, not {device.type}" + ("" if ok else f"; also: {why}")
            continue
        if backend == "auto" and not b.auto:
            reasons[name] = "not chosen automatically (pass backend='reference')"
            continue
        if name == "triton" and backend == "auto" and device.type == "cpu":
            # never probed here: importing triton costs ~50 MB and seconds in every CPU process
            reasons[name] = ("Triton on CPU runs only in its interpreter (slow; TRITON_INTERPRET=1 before "
                             "import); pass backend='triton' to use it")
            continue
        ok, why = b.status()
        if name == "triton" and device.type == "cpu" and ok and not _triton_interprets():
            reasons[name] = "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import); it is off"
            continue
        if not ok:
            reasons[name] = why
            continue
        r = accepts(name)
        if r is None:
            if backend != "auto" or measured is None:
                return name
            candidates.append(name)
            continue
        reasons[name] = r
    if candidates:
        return _measured_first(candidates, measured)
    if backend != "auto":  # the explicit one cannot: say what the others would do
        for name in BACKENDS:
            if name == backend:
                continue
            b = REGISTRY[name]
            if device.type not in b.devices:
                reasons[name] = f"runs on {'/'.join(b.devices)}, not {device.type}"
                continue
            ok, why = b.status()
            if not ok:
                reasons[name] = why
            elif name == "triton" and device.type == "cpu" and not _triton_interprets():
                reasons[name] = "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)"
            else:
                r = accepts(name)
                reasons[name] = f"could serve this call (backend={name!r})" if r is None else r
    lines = "\n".join(f"  {n}: {r}" for n, r in reasons.items())
    raise NotImplementedError(f"no backend can serve this call (backend={backend!r}, device={device}):\n{lines}")
