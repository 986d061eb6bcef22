"""Who may use the engine right now: one holder at a time.

A holder is a single call (attach, set_adapters, ...), a ``session()`` spanning several calls from
one thread, or an open stream. Unlike an ``RLock`` the gate:

- can be released from another thread (a stream started in one thread and closed in another);
- refuses re-entry from the thread that holds an open stream, instead of letting a switch or a
  nested generation change the adapters under a suspended stream (mislabelled, corrupted output).

Other threads wait their turn.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from edgelora.errors import EngineBusyError


class Gate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._owner: int | None = None  # thread ident of the holder
        self._depth = 0
        self._streams = 0  # open streams among the holds

    def acquire(self, *, stream: bool = False, timeout: float | None = None) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                if self._streams:
                    raise EngineBusyError(
                        "a generation is still streaming in this thread; finish or close it before "
                        "switching adapters or generating again"
                    )
            elif not self._cond.wait_for(lambda: self._owner is None, timeout):
                raise EngineBusyError(f"the engine stayed busy for {timeout:g} s")
            self._owner = me
            self._depth += 1
            self._streams += stream

    def release(self, *, stream: bool = False) -> None:
        """May be called from any thread (a stream closed elsewhere)."""
        with self._cond:
            if self._depth == 0:
                return
            self._depth -= 1
            self._streams -= stream
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @contextmanager
    def hold(self, timeout: float | None = None):
        self.acquire(timeout=timeout)
        try:
            yield
        finally:
            self.release()

    @property
    def busy(self) -> bool:
        return self._owner is not None
