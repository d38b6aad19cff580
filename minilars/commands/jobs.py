"""Independent child processes run several at a time, for `minilars study accuracy --jobs N`.

    jobs = Jobs(2)
    jobs.map(fn, items)          [fn(x) for x in items]; with N > 1 each call on its own
                                 thread (calls may nest: a method's runs inside the methods)
    jobs.start(fn, *args)        one call begun alongside; .result() waits for it
    with jobs.process(start) as proc:
        ...                      start() runs once a slot is free: at most N processes
                                 are alive at once, whatever the nesting
    with jobs.chain():
        ...                      one slot held for the whole block: its processes (one
                                 after another, on this thread) start without waiting
    jobs.stop()                  kill every live process; later starts raise KeyboardInterrupt

The threads only wait on processes; the work is in the processes, so the GIL costs
nothing. map never queues calls on a fixed pool (a call that waits on its own nested
map would deadlock one): every call gets a thread, and the slots bound the processes.
Ctrl-C or SIGTERM reaches the main thread inside map, which stops every process and
re-raises, so no training process outlives the study.

A chain is work whose processes depend on each other, such as a seed's training and
then its scoring. Holding one slot from the first process to the last, a chain that
has begun finishes before later work takes its slot: its result is reported as soon as
it can be, at the same throughput. (Without it, the slot freed by a training goes to
the next one waiting, and every training runs before the first scoring.) Nothing
inside a chain may wait on work that needs a slot of its own.
"""
from __future__ import annotations

import subprocess
import threading
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable, Iterator, TypeVar

X = TypeVar("X")
Y = TypeVar("Y")


class Jobs:
    def __init__(self, n: int = 1):
        if n < 1:
            raise ValueError(f"jobs must be >= 1, got {n}")
        self.n = n
        self._slots = threading.BoundedSemaphore(n)
        self._lock = threading.Lock()
        self._live: set[subprocess.Popen] = set()
        self._holds = threading.local()  # .chain: this thread is inside chain() and holds a slot
        self._stopped = False
        self.most_alive = 0  # the largest number of processes alive at once so far

    @contextmanager
    def process(self, start: Callable[[], subprocess.Popen]) -> Iterator[subprocess.Popen]:
        """start() once a slot is free (at once inside chain(), which holds one); the
        slot is held until the block ends."""
        with nullcontext() if getattr(self._holds, "chain", False) else self._slots:
            with self._lock:
                if self._stopped:
                    raise KeyboardInterrupt("the study was stopped")
                proc = start()
                self._live.add(proc)
                self.most_alive = max(self.most_alive, len(self._live))
            try:
                yield proc
            finally:
                with self._lock:
                    self._live.discard(proc)

    @contextmanager
    def chain(self) -> Iterator[None]:
        """Hold one slot for the block; the processes it starts run in it, in turn."""
        if getattr(self._holds, "chain", False):
            raise RuntimeError("chains do not nest: the inner one would wait for a second slot")
        with self._slots:
            self._holds.chain = True
            try:
                yield
            finally:
                self._holds.chain = False

    def stop(self) -> None:
        """Kill every live process; no process starts after this."""
        with self._lock:
            self._stopped = True
            for proc in self._live:
                proc.kill()

    def start(self, fn: Callable[..., Y], *args) -> "Started":
        """fn(*args) begun now: on its own thread when n > 1, else run here at once
        (an exception it raises is raised here)."""
        return Started(fn, args, threaded=self.n > 1)

    def map(self, fn: Callable[[X], Y], items: Iterable[X]) -> list[Y]:
        """[fn(x) for x in items], concurrently when n > 1; the first exception (in
        item order) is raised once every call has ended."""
        items = list(items)
        if self.n == 1 or len(items) < 2:
            return [fn(x) for x in items]
        calls = [self.start(fn, x) for x in items]
        try:
            for call in calls:
                call.wait()  # short waits, so Ctrl-C reaches this thread
        except BaseException:
            self.stop()
            for call in calls:
                call.wait()
            raise
        return [call.result() for call in calls]


class Started:
    """One call begun by Jobs.start; result() waits for it and returns its value or
    raises what it raised."""

    def __init__(self, fn: Callable, args: tuple, threaded: bool):
        self._value, self._error, self._thread = None, None, None
        if threaded:
            self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
            self._thread.start()
        else:
            self._run(fn, args)
            if self._error is not None:
                raise self._error

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as e:  # carried to the thread that asks for the result
            self._error = e

    def wait(self) -> None:
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.2)

    def result(self):
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


__all__ = ["Jobs", "Started"]
