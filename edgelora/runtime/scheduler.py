"""The scheduler: several sequences on one model, decoded together.

Every generation (ask, the TUI, the server, the Python API) is a ``SeqRequest`` submitted here; one
request at a time is the case of one running sequence, not another code path.

- **Adapter sets and lanes.** A request carries its own adapter set (handles, scales, and the key
  naming it). llama.cpp applies adapters per context, not per token, so a decode step takes the
  running sequences of ONE set in one context, all of them in one batch. Switching a context's set
  costs llama.cpp a re-reserve (~7 ms beside a 13 ms decode here), switching between contexts
  nothing: so each set running at once gets a *lane* of its own (a llama.cpp context on the same
  weights, with its own KV cells; up to ``lanes``, made when first needed), and a set that finds
  every lane taken shares one, taking turns of ``STEPS_PER_SET`` steps there. Groups take turns
  round robin: a long answer never blocks a short one, and no token is computed under another set.
- **Prompts** are evaluated in chunks inside the same steps as the other sequences' next tokens:
  ``chunk_busy`` tokens a step while other sequences are generating, a whole ``n_batch`` otherwise.
- **KV.** A slot (a llama.cpp seq_id) remembers the tokens it evaluated and the set that computed
  them. A request takes the free slot whose cells share its longest prefix under the same set (a
  returning conversation is not re-evaluated); cells of another set are never reused: they are
  saved under their set's key (within a byte budget, ``saved``, several states per set) and
  cleared, and cells of the request's set are put back: copied from another slot of that set (idle
  or running, any lane) or a saved state of it, whichever holds more of its prompt.
- **Driving.** Whoever waits for a token runs steps (``tokens``), in its own thread, under one lock:
  the one thread of ask or the TUI's worker, the server's worker. No thread of its own.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from edgelora.errors import AdapterError, EdgeloraError
from edgelora.runtime.kv import KVStateCache
from edgelora.runtime.kv import common_prefix as _common_prefix
from edgelora.runtime.llama import Context, LlamaHandle, Sampler, TokenBatch
from edgelora.runtime.thread_policy import ThreadPolicy

# Steps one adapter set runs in a row before the next set's turn (when several sets are running).
# A switch costs llama.cpp a scheduler re-reserve, ~7 ms here beside a 13 ms one-token decode
# (README 'How requests are served'); 4 steps amortize it. 4 streams,
# 64 tokens, base/base/pirate/terse vs all pirate, one run: mixed/one-role 0.72 at 1, 0.78 at 2,
# 0.98 at 4, 0.89 at 8. The price: another set's answer waits up to 4 steps per set ahead of it.
STEPS_PER_SET = 4
# A request waits one step for a running sequence of its set that is evaluating a prompt start they
# share, when it shares at least this many tokens more than any slot holds now (see _behind_leader).
LEADER_MIN_SHARED = 16
# A slot whose cells a request of their set would cut by more than this many tokens held another
# conversation: they are saved first. Fewer is a conversation going on (the re-rendered end of its answer).
SAVE_CUT = 16
CHUNK_BUSY = 128  # prompt tokens per step while others generate: a 128-token chunk costs them ~2 tokens' time


@dataclass(frozen=True)
class SamplerSettings:
    temp: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0


@dataclass
class SeqRequest:
    """Everything one generation needs; nothing else crosses from the engine into the scheduler."""

    tokens: list[int]
    adapters: tuple[tuple[object, float], ...]  # (llama.cpp adapter handle, scale), in order
    key: tuple  # identity of that set (adapters.set_key): what KV cells computed under it are filed by
    max_tokens: int
    sampling: SamplerSettings = SamplerSettings()
    reuse_prefix: bool = True  # False: the whole prompt is evaluated anew (README 'Reproducibility')


class Seq:
    """One running generation: its slot, the prompt left to evaluate, the tokens sampled so far."""

    _ids = itertools.count(1)

    def __init__(self, request: SeqRequest):
        self.id = next(self._ids)
        self.request = request
        self.slot: Slot | None = None
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.last: int | None = None  # the sampled token to decode next
        self.out: deque[int] = deque()  # sampled, not yet taken by the consumer
        self.n_sampled = 0
        self.cached = 0  # prompt tokens whose cells were reused
        self.sampler: Sampler | None = None
        self.cancelled = False
        self.done = False
        self.error: BaseException | None = None

    @property
    def key(self) -> tuple:
        return self.request.key


@dataclass(eq=False)
class Slot:
    seq_id: int  # llama.cpp's, in its lane's context
    lane: Lane = None  # type: ignore[assignment]
    id: int = 0  # across lanes (reports)
    key: tuple | None = None  # the adapter set that computed ``tokens``
    tokens: list[int] = None  # type: ignore[assignment]  # what the sequence's cells hold, position by position
    seq: Seq | None = None
    used_at: float = 0.0

    def __post_init__(self):
        self.tokens = [] if self.tokens is None else self.tokens


class Lane:
    """One llama.cpp context and its slots (one per sequence it holds); one adapter set at a time."""

    def __init__(self, index: int, context: Context, n_seq: int):
        self.index = index
        self.context = context
        self.slots = [Slot(i, self, index * n_seq + i) for i in range(n_seq)]
        self.applied: tuple | None = None  # the set the context has now (None: unknown)
        self.threads_now: int | None = None

    def keys(self) -> set[tuple]:
        """The adapter sets of its running sequences."""
        return {slot.seq.key for slot in self.slots if slot.seq is not None}

    def free(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.seq is None]


class Scheduler:
    def __init__(self, llama: LlamaHandle, *, kv_cache_bytes: int, threads: ThreadPolicy | None = None,
                 chunk_busy: int = CHUNK_BUSY, lanes: int = 1):
        self.llama = llama
        self.n_seq = llama.n_seq  # the most sequences running at once, over all lanes
        self.max_lanes = max(1, lanes)
        self.queue: deque[Seq] = deque()
        self.saved = KVStateCache(kv_cache_bytes)  # states of sets whose slot was taken by another
        self.threads = threads
        self.n_batch = llama.n_batch()
        self.chunk_busy = min(chunk_busy, self.n_batch)
        self.batch = TokenBatch(self.n_batch)
        self._lock = threading.RLock()
        self._last_group: tuple | None = None  # round robin over (lane, set) groups
        self._run = 0  # steps the last group has run in a row
        self.steps_per_set = STEPS_PER_SET
        self.leader_min_shared = LEADER_MIN_SHARED
        self._in_batch: list[Seq] = []
        self.interrupted = False  # Ctrl+C arrived inside llama.cpp (the abort callback saw it)
        # Let cancel() and Ctrl+C stop a decode that evaluates a prompt. The server turns it off: it
        # stops answers between steps, and the callback takes the GIL at every graph node, which its
        # event loop's thread often holds (4 clients here, 6 runs each, noisy: median 67 tok/s with it, 71 without).
        self.watch_prompts = True
        self.lanes: list[Lane] = []
        self._add_lane(llama.main)
        self.last_slot: Slot = self.slots[0]
        self.steps = 0

    def _add_lane(self, context: Context) -> Lane:
        context.on_abort(self._should_abort)
        lane = Lane(len(self.lanes), context, self.n_seq)
        self.lanes.append(lane)
        return lane

    @property
    def slots(self) -> list[Slot]:
        return [slot for lane in self.lanes for slot in lane.slots]

    # ------------------------------------------------------------ requests

    def submit(self, request: SeqRequest) -> Seq:
        """Queue a generation; it starts at the next step with a free slot."""
        seq = Seq(request)
        with self._lock:
            self.queue.append(seq)
        return seq

    def tokens(self, seq: Seq) -> Iterator[int]:
        """The sequence's tokens as they come, running steps (for every sequence) while none is ready.
        Raises what failed it; ends when it is done."""
        while True:
            if seq.out:
                yield seq.out.popleft()
                continue
            if seq.done:
                if seq.error is not None:
                    raise seq.error
                return
            if not self.step() and not seq.done:  # nothing left to run it: never wait forever
                seq.error, seq.done = EdgeloraError("the generation was dropped before it started"), True

    def cancel(self, seq: Seq) -> None:
        """Stop a sequence (any thread): it ends at the next step, or now if it never started."""
        seq.cancelled = True

    def cancel_all(self) -> None:
        for seq in [*self.queue, *self.running]:
            seq.cancelled = True

    def release(self, seq: Seq) -> None:
        """The consumer is gone: end the sequence now and free its slot (its cells stay for reuse)."""
        seq.cancelled = True
        with self._lock:
            self._finish(seq)

    @property
    def running(self) -> list[Seq]:
        return [s.seq for s in self.slots if s.seq is not None]

    def in_use(self, handle) -> bool:
        """Is this adapter part of a queued or running sequence's set?"""
        seqs = [*self.queue, *self.running]
        return any(h is handle for seq in seqs for h, _ in seq.request.adapters)

    def forget_adapters(self) -> None:
        """Detach every adapter from every context (before one is freed); the next step sets its own."""
        with self._lock:
            for lane in self.lanes:
                lane.context.set_adapters([])
                lane.applied = ()

    def clear(self) -> None:
        """Forget every idle slot's cells and the saved states."""
        with self._lock:
            self.saved.clear()
            for slot in self.slots:
                if slot.seq is None:
                    self._wipe(slot)

    def report(self) -> list[dict]:
        """Each slot: whether it is answering, the tokens its cells hold, the adapter set that computed them."""
        return [{"id": slot.id, "lane": slot.lane.index, "is_processing": slot.seq is not None,
                 "n_cached": len(slot.tokens),
                 "adapters": [{"name": name, "scale": scale} for name, _, scale in (slot.key or ())]}
                for slot in list(self.slots)]

    # ------------------------------------------------------------ one step

    def step(self) -> bool:
        """Admit what fits, then one decode for one group (a lane's sequences of one adapter set). False when idle."""
        with self._lock:
            self._admit()
            for seq in self.running:
                if seq.cancelled or seq.n_sampled >= seq.request.max_tokens:
                    self._finish(seq)
            lane, group = self._next_group()
            if not group:
                return bool(self.queue)
            self._apply(lane, group[0].request)
            entries = self._fill(group)
            self._decode(lane, entries)
            self.steps += 1
            return True

    def _next_group(self) -> tuple[Lane | None, list[Seq]]:
        groups: dict[tuple, list[Seq]] = {}
        for slot in self.slots:
            if slot.seq is not None:
                groups.setdefault((slot.lane.index, slot.seq.key), []).append(slot.seq)
        if not groups:
            return None, []
        names = list(groups)
        # Turns of several steps only while some lane switches sets; switching lanes costs nothing.
        turn = self.steps_per_set if any(len(lane.keys()) > 1 for lane in self.lanes) else 1
        last = self._last_group
        if last in groups and self._run < turn:
            pick = last
        else:
            pick = names[(names.index(last) + 1) % len(names)] if last in groups else names[0]
        self._run = self._run + 1 if pick == last else 1
        self._last_group = pick
        return self.lanes[pick[0]], groups[pick]

    def _apply(self, lane: Lane, request: SeqRequest) -> None:
        if request.key == lane.applied:
            return
        if not lane.context.set_adapters(list(request.adapters)):
            lane.applied = None
            raise AdapterError("llama.cpp could not set the adapters of a request")
        lane.applied = request.key

    def _fill(self, group: list[Seq]) -> list[tuple[Seq, list[int], int | None]]:
        """The batch for this step: each generating sequence's last token, then prompt chunks."""
        self.batch.clear()
        entries = []
        for seq in group:
            if not seq.pending and seq.last is not None:
                index = self.batch.add(seq.last, len(seq.slot.tokens), seq.slot.seq_id, True)
                entries.append((seq, [seq.last], index))
        room = self.n_batch - self.batch.n
        generating = len(entries) or any(not s.pending for s in self.running)
        for seq in group:
            if not seq.pending or room <= 0:
                continue
            n = min(len(seq.pending), room, self.chunk_busy if generating else room)
            chunk, start = seq.pending[:n], len(seq.slot.tokens)
            index = None
            for i, token in enumerate(chunk):
                last = i == n - 1 and n == len(seq.pending)
                at = self.batch.add(token, start + i, seq.slot.seq_id, last)
                index = at if last else index
            entries.append((seq, chunk, index))
            room -= n
        return entries

    def _decode(self, lane: Lane, entries) -> None:
        n = self.batch.n
        prompt = n > len(entries)  # some sequence evaluates more than one token
        threads = self._set_threads(lane, "prompt" if prompt else "generation", n)
        self._in_batch = [seq for seq, _, _ in entries]
        context = lane.context
        context.watch_abort(prompt and self.watch_prompts)  # a Python round trip per graph node: prompts only
        t0 = time.perf_counter()
        try:
            status = context.decode(self.batch)
        except BaseException:
            self._fail(entries, KeyboardInterrupt())
            raise
        finally:
            context.watch_abort(False)
            self._in_batch = []
        if self.threads is not None:
            self.threads.observe("prompt" if prompt else "generation", threads, time.perf_counter() - t0, n)
        if status == 2:  # the abort callback: every sequence in it was cancelled (or Ctrl+C)
            self._fail(entries, None)
            if self.interrupted:
                self.interrupted = False
                raise KeyboardInterrupt
            return
        if status != 0:
            self._fail(entries, EdgeloraError(f"llama_decode failed (status {status}); the context may be too small"))
            return
        for seq, tokens, index in entries:
            seq.slot.tokens.extend(tokens)
            if seq.pending:
                del seq.pending[:len(tokens)]
            if index is None:
                continue
            token = seq.sampler.sample(index)
            seq.last = token
            seq.n_sampled += 1
            seq.out.append(token)
            if self.llama.is_eog(token) or seq.n_sampled >= seq.request.max_tokens:
                self._finish(seq)

    def _set_threads(self, lane: Lane, kind: str, n_tokens: int) -> int | None:
        if self.threads is None:
            return None
        n = self.threads.choose(kind, n_tokens)
        if n != lane.threads_now:
            lane.context.set_threads(n, n)
            lane.threads_now = n
        return n

    def _fail(self, entries, error: BaseException | None) -> None:
        """A decode that did not complete: what it wrote to these sequences' cells is incomplete."""
        for seq, _, _ in entries:
            self._wipe(seq.slot)
            seq.error = error
            seq.cancelled = seq.cancelled or error is None
            self._finish(seq)

    def _should_abort(self, _data) -> bool:
        try:
            return bool(self._in_batch) and all(seq.cancelled for seq in self._in_batch)
        except KeyboardInterrupt:  # the signal handler ran inside the callback
            self.interrupted = True
            return True

    # ------------------------------------------------------------ lanes and slots

    def _admit(self) -> None:
        behind: list[Seq] = []
        while self.queue and len(self.running) < self.n_seq:
            seq = self.queue.popleft()
            if seq.cancelled:
                seq.done = True
                continue
            if self._behind_leader(seq.request):
                behind.append(seq)
                continue
            self._place(seq, self._lane_for(seq.request))
        self.queue.extendleft(reversed(behind))

    def _behind_leader(self, request: SeqRequest) -> bool:
        """Should this request wait a step for a running sequence of its set that is about to evaluate
        a prompt start they share (a system prompt), to copy those cells instead of evaluating them
        again beside it? Requests of one role arriving at once: the first goes ahead alone and the
        others copy its cells a step later (their first token at t(P) + t(P - shared) instead of
        t(n * P) on a compute-bound CPU). The wait ends when the leader's cells hold the shared part,
        or it stops running."""
        if not request.reuse_prefix or self.leader_min_shared <= 0:
            return False
        key, tokens = request.key, request.tokens
        have = max([_common_prefix(s.tokens, tokens) for s in self.slots if s.key == key]
                   + [self.saved.best(key, tokens)[0]])
        coming = max((_common_prefix(s.tokens + s.seq.pending, tokens) for s in self.slots
                      if s.seq is not None and s.key == key and s.seq.pending), default=0)
        return coming - have >= self.leader_min_shared

    def _lane_for(self, request: SeqRequest) -> Lane:
        """Where a request runs: beside sequences of its own set (one batch), else an idle lane (the
        one holding most of its prompt under its set), else a new lane while ``lanes`` allows, else
        the lane hosting the fewest sets (they take turns there)."""
        key = request.key
        joining = [lane for lane in self.lanes if key in lane.keys() and lane.free()]
        if joining:
            return joining[0]
        idle = [lane for lane in self.lanes if not lane.keys()]
        if idle:
            def fit(lane: Lane) -> tuple[int, bool]:
                cached = max((_common_prefix(s.tokens, request.tokens) for s in lane.slots if s.key == key), default=0)
                return cached, lane.applied == key
            return max(idle, key=fit)
        if len(self.lanes) < self.max_lanes:
            try:
                return self._add_lane(self.llama.new_context())
            except (ValueError, MemoryError):  # llama.cpp could not make another context: share one
                self.max_lanes = len(self.lanes)
        return min((lane for lane in self.lanes if lane.free()), key=lambda lane: len(lane.keys()))

    def _place(self, seq: Seq, lane: Lane) -> None:
        request = seq.request
        tokens = request.tokens
        free = lane.free()
        same = [s for s in free if s.key == request.key and s.tokens] if request.reuse_prefix else []
        slot = max(same, key=lambda s: _common_prefix(s.tokens, tokens), default=None)
        have = _common_prefix(slot.tokens, tokens) if slot is not None else 0
        state = self._state_elsewhere(request, more_than=have) if request.reuse_prefix else None
        context = lane.context
        if slot is None or state is not None:  # an empty slot, else the one used longest ago
            slot = min(free, key=lambda s: (bool(s.tokens), s.used_at))
            self._put_aside(slot)
            self._wipe(slot)
            if state is not None and context.load_state(state, slot.seq_id):
                slot.tokens = [int(t) for t in state.tokens]
        keep = _common_prefix(slot.tokens, tokens)
        if keep == len(tokens):
            keep -= 1  # the last prompt token is evaluated again: its logits give the first answer token
        if state is None and len(slot.tokens) - keep > SAVE_CUT:  # another conversation of this set held the slot
            self._put_aside(slot)
        if keep < len(slot.tokens) and not context.seq_rm(slot.seq_id, keep):
            keep = 0  # llama.cpp could not cut there (a sliding-window cache): it dropped them all
        del slot.tokens[keep:]
        slot.key, slot.seq, slot.used_at = request.key, seq, time.monotonic()
        seq.slot, seq.cached, seq.pending = slot, keep, list(tokens[keep:])
        s = request.sampling
        seq.sampler = context.sampler(temp=s.temp, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                                      repeat_penalty=s.repeat_penalty, seed=s.seed)
        if s.repeat_penalty != 1.0:
            seq.sampler.accept(tokens)
        self.last_slot = slot

    def _state_elsewhere(self, request: SeqRequest, more_than: int = 0):
        """Cells of the request's set holding more than ``more_than`` tokens of its prompt: copied from
        another slot, idle or running, of any lane (a returning conversation whose lane is busy with
        another set is not re-evaluated, and requests of one role that arrive together evaluate their
        shared system prompt once), or a state saved under its set (a conversation whose slot other
        clients took), whichever holds more. A running slot's cells are whole between steps: its
        tokens grow only after a decode succeeded."""
        donors = [s for s in self.slots if s.key == request.key and s.tokens]
        shared, donor = max(((_common_prefix(s.tokens, request.tokens), s) for s in donors),
                            key=lambda pair: pair[0], default=(0, None))
        saved_shared, saved = self.saved.best(request.key, request.tokens)
        if saved_shared > max(shared, more_than):
            return saved
        if shared > more_than:
            return donor.lane.context.save_state(donor.seq_id, donor.tokens)
        return None

    def _put_aside(self, slot: Slot) -> None:
        """Save a slot's cells under their set before another request takes or cuts them."""
        if slot.tokens and slot.key is not None and self.saved.budget:
            self.saved.put(slot.key, slot.lane.context.save_state(slot.seq_id, slot.tokens))

    def _wipe(self, slot: Slot) -> None:
        slot.lane.context.seq_rm(slot.seq_id, -1)
        slot.tokens = []
        slot.key = None

    def _finish(self, seq: Seq) -> None:
        if seq.done:
            return
        seq.done = True
        if seq in self.queue:
            self.queue.remove(seq)
        slot = seq.slot
        if slot is not None and slot.seq is seq:
            slot.seq = None
            slot.used_at = time.monotonic()
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None

    # ------------------------------------------------------------ one-off evaluation

    def logits(self, tokens: list[int], adapters, key: tuple):
        """Last-position logits of ``tokens`` under ``adapters``, evaluated from scratch in a free slot
        of the first lane."""
        chunk = self.n_batch
        with self._lock:
            lane = self.lanes[0]
            free = lane.free()
            if not free or len(self.running) >= self.n_seq:
                raise EdgeloraError("every sequence is busy; try again when a generation ends")
            slot = min(free, key=lambda s: (bool(s.tokens), s.used_at))
            self._wipe(slot)
            self._apply(lane, SeqRequest(tokens, adapters, key, 1))
            for start in range(0, len(tokens), chunk):
                self.batch.clear()
                part = tokens[start:start + chunk]
                for i, token in enumerate(part):
                    self.batch.add(token, start + i, slot.seq_id, start + i == len(tokens) - 1)
                status = lane.context.decode(self.batch)
                if status != 0:
                    self._wipe(slot)
                    raise EdgeloraError(f"llama_decode failed (status {status})")
                slot.tokens.extend(part)
            slot.key = key
            return lane.context.logits_at(self.batch.n - 1)
