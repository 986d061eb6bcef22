"""Saved KV states, keyed by the adapter set that computed them.

When the scheduler (scheduler.py) gives a slot to another request, the slot's cells are saved here
under their set's key, and a request whose prompt starts like a saved state of its own set gets those
cells back: switching back to a role, or a conversation returning after other clients of its role
took its slot, evaluates only the new tokens, and cells never serve another set. Several states per
set (one per conversation put aside), the least recently used dropped first, within a byte budget."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from edgelora.runtime.llama import SeqState

KVState = SeqState  # the KV cells of one sequence and the tokens they hold, saved under one adapter set


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


class KVStateCache:
    """Saved KV states per adapter set, least recently used dropped first, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._states: OrderedDict[int, tuple[tuple, KVState]] = OrderedDict()  # oldest use first
        self._ids = itertools.count()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s in self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    def keys(self) -> list[tuple]:
        """The adapter set of each saved state (a set appears once per state)."""
        return [key for key, _ in self._states.values()]

    def put(self, key: tuple, state: KVState) -> None:
        """Save a state of set ``key``. One that only continues a saved state of its set (the same
        conversation, longer) replaces it; one a saved state already holds in full adds nothing."""
        n = len(state.tokens)
        for i, (k, saved) in list(self._states.items()):
            if k != key:
                continue
            shared = common_prefix(saved.tokens, state.tokens)
            if shared == len(saved.tokens):
                del self._states[i]
            elif shared == n:
                self._states.move_to_end(i)
                return
        if state.nbytes > self.budget:
            return
        self._states[next(self._ids)] = (key, state)
        while self.nbytes > self.budget:
            self._states.popitem(last=False)

    def best(self, key: tuple, tokens: Sequence[int]) -> tuple[int, KVState | None]:
        """(tokens shared, state): the saved state of set ``key`` whose tokens start most like
        ``tokens`` ((0, None) when none shares any). A look, not a use: nothing moves, and the state
        stays saved (it may serve again; a slot's longer state replaces it when that is put aside)."""
        shared, pick = 0, None
        tokens = np.asarray(tokens)
        for i, (k, saved) in self._states.items():
            if k == key:
                n = common_prefix(saved.tokens, tokens)
                if n > shared:
                    shared, pick = n, i
        return (shared, self._states[pick][1]) if pick is not None else (0, None)

    def drop_serial(self, serial: int) -> None:
        for i in [i for i, (k, _) in self._states.items() if any(item[1] == serial for item in k)]:
            del self._states[i]

    def clear(self) -> None:
        self._states.clear()
