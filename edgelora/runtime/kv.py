"""The KV cache across adapter switches, keyed by the adapter set that computed it.

Setting adapters does not touch the KV cache, and ``generate`` reuses the longest matching token
prefix: cells computed under another adapter set would silently mix adapters. So before any decode
the cells are kept only if the same set (names, adapter identities, scales) computed them; else the
state is saved under its set's key and cleared, and a state saved earlier under the new set is put
back (switching back to a role evaluates only the new tokens)."""

from __future__ import annotations

from collections import OrderedDict

from edgelora.runtime.llama import LlamaHandle, SeqState

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


class KVSets:
    """Which adapter set computed the cells of a sequence now in the context, and what to do on a switch."""

    def __init__(self, llama: LlamaHandle, budget_bytes: int, seq_id: int = 0):
        self.llama = llama
        self.seq_id = seq_id
        self.key: tuple = ()  # the adapter set that computed the tokens now in the KV cache
        # KV states of the current conversation under other adapter sets. 0 disables.
        self.saved = KVStateCache(budget_bytes)

    def prepare(self, key: tuple) -> None:
        """Before any decode under ``key``: forget cells computed under a different set (saving them)."""
        if key == self.key:
            return
        if self.saved.budget and self.llama.n_cached(self.seq_id):
            self.saved.put(self.key, self.llama.save_state(self.seq_id))
        self.clear()
        state = self.saved.take(key)
        if state is not None:
            self.llama.restore_state(state, self.seq_id)  # one that does not fit leaves nothing: evaluated anew
        self.key = key

    def clear(self) -> None:
        self.llama.clear(self.seq_id)
