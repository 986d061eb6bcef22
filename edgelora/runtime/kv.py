"""Saved KV states, keyed by the adapter set that computed them.

When the scheduler (scheduler.py) gives a slot to a request of another adapter set, the slot's
cells are saved here under their set's key and a state saved under the new set is put back:
switching back to a role evaluates only the new tokens, and cells never serve another set."""

from __future__ import annotations

from collections import OrderedDict

from edgelora.runtime.llama import SeqState

KVState = SeqState  # the KV cells of one sequence and the tokens they hold, saved under one adapter set


class KVStateCache:
    """Saved KV states per adapter set, least recently used dropped first, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._states: OrderedDict[tuple, KVState] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    def put(self, key: tuple, state: KVState) -> None:
        self._states.pop(key, None)
        if state.nbytes > self.budget:
            return
        self._states[key] = state
        while self.nbytes > self.budget:
            self._states.popitem(last=False)

    def take(self, key: tuple) -> KVState | None:
        return self._states.pop(key, None)

    def drop_serial(self, serial: int) -> None:
        for key in [k for k in self._states if any(item[1] == serial for item in k)]:
            del self._states[key]

    def clear(self) -> None:
        self._states.clear()
