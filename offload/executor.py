"""The streaming executor: background reads of the streamed units into a ring of slots.

One coordinator thread walks the streamed units in the order the model consumes them,
cyclically (after the last layer of one step comes the first of the next), and for each takes a
free slot and reads the unit's checksum pages into it with a pool of ``io_threads`` readers
(several reads in flight keep the disk queue busy; ``os.preadv`` and crc32c release the GIL).
The compute side takes ready units in the same order, computes on zero-copy views of the slot,
and hands the slot back. Time the compute side waits for a unit is the *stall*.

A read error (a corrupt page, a truncated file) stops the ring: the error is raised to the
compute side at the unit it belongs to and again on every later call, so no forward ever uses a
slot that was not fully read and verified.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

__all__ = ["Streamer"]


class Streamer:
    """Reads ``order`` (unit names, cyclically) from ``store`` into ``slots`` buffers of
    ``slot_bytes`` each.

    Use ``acquire(unit)`` -> (slot index, buffer), compute, ``release(slot)``; units must be
    acquired in ``order``. ``skip_to_start()`` realigns after an interrupted pass.
    """

    def __init__(self, store, order: list[str], slots: int, slot_bytes: int, io_threads: int = 4):
        if not order:
            raise ValueError("order: expected at least one streamed unit")
        if slots < 2:
            raise ValueError(f"slots: expected >= 2, got {slots}")
        if io_threads < 1:
            raise ValueError(f"io_threads: expected >= 1, got {io_threads}")
        self.store, self.order = store, list(order)
        self.bufs = [store.alloc(slot_bytes) for _ in range(slots)]
        self._pages = {u: len(store.units[u]["pages"]) for u in self.order}
        self._free: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        for i in range(slots):
            self._free.put(i)
        self._pos = 0  # compute side's position in ``order``
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.bytes_read = 0
        self.io_busy_s = 0.0
        self.stall_s = 0.0
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="offload-io")
        self._thread = threading.Thread(target=self._run, name="offload-prefetch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ reader side
    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            slot = self._free.get()
            if slot is None or self._stop.is_set():
                return
            unit = self.order[i % len(self.order)]
            i += 1
            buf = self.bufs[slot]
            t0 = time.perf_counter()
            try:
                futs = [self._pool.submit(self.store.read_page, unit, p, buf) for p in range(self._pages[unit])]
                err = None
                for f in futs:
                    try:
                        f.result()
                    except BaseException as e:  # keep the first, wait for the rest (they write into buf)
                        err = err or e
                if err is not None:
                    raise err
            except BaseException as e:
                self._ready.put((unit, slot, e))
                return
            self.io_busy_s += time.perf_counter() - t0
            self.bytes_read += self.store.unit_nbytes(unit)
            self._ready.put((unit, slot, None))

    # ------------------------------------------------------------------ compute side
    def acquire(self, unit: str):
        """Block until ``unit`` is read and verified; -> (slot, buffer)."""
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("offload executor: closed")
        want = self.order[self._pos]
        if unit != want:
            raise RuntimeError(f"offload executor: {unit!r} requested, {want!r} is next in the stream order")
        t0 = time.perf_counter()
        while True:
            try:
                got, slot, err = self._ready.get(timeout=0.5)
                break
            except queue.Empty:
                if self._stop.is_set():
                    raise RuntimeError("offload executor: closed") from None
                if not self._thread.is_alive():
                    self._error = RuntimeError("offload executor: the prefetch thread stopped")
                    raise self._error from None
        self.stall_s += time.perf_counter() - t0
        if err is not None:
            self._error = err
            raise err
        if got != unit:  # never compute a layer on another layer's weights
            self._error = RuntimeError(f"offload executor: read {got!r} where {unit!r} was due (stream out of order)")
            raise self._error
        self._pos = (self._pos + 1) % len(self.order)
        return slot, self.bufs[slot]

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def consume(self, count: int) -> None:
        """Take and hand back the next ``count`` units in order, computing nothing (an I/O-only
        pass, or skipping what an interrupted pass left)."""
        for _ in range(count):
            slot, _ = self.acquire(self.order[self._pos])
            self.release(slot)

    def skip_to_start(self) -> None:
        """After a pass that stopped part-way (an exception in a layer), consume the rest of the
        cycle so the next pass starts at the first streamed unit again."""
        self.consume((len(self.order) - self._pos) % len(self.order))

    def close(self) -> None:
        self._stop.set()
        self._free.put(None)
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)
        # the slot buffers stay until the Streamer is collected: a caller may still hold views

