"""The server's one worker thread. It owns the engine and the roles: it starts every job, so roles
are selected one request at a time, and it advances every running answer a piece at a time.

A round starts every queued job (up to ``parallel`` running): an answer's first step only selects
its role and queues its request, so requests that arrived together have their prompts evaluated in
one decode. Then it advances every running answer by one piece.

An answer (a generator job: ``run()`` yields None once queued, then text pieces, and returns the
result) is a scheduler
sequence with its own adapter set (runtime/scheduler.py): up to ``parallel`` run at once, decoded
together, and a switch for one never touches another's tokens. Other jobs (reload, preload, evict)
run between two rounds. A job that waits beyond ``max_queue`` is refused with 503."""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from edgelora.errors import EdgeloraError
from edgelora.frontends.server.requests import APIError, api_error
from edgelora.runtime.engine import Engine


@dataclass
class Job:
    """One unit of work: ``run()`` yielding pieces and returning the result (an answer), or returning it."""

    run: Callable[[], Generator[str, None, dict] | dict]
    loop: asyncio.AbstractEventLoop
    streaming: bool = False  # pieces are sent to the client as they come; otherwise only the result
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def put(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    def __init__(self, engine: Engine, max_queue: int, parallel: int = 1):
        self.engine = engine
        self.parallel = parallel
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.running: list[tuple[Job, Generator]] = []
        self.served = 0
        self.cancelled = 0  # jobs whose client went away (dropped from the queue or stopped mid-answer)
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="edgelora-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({self.jobs.maxsize} requests queued); retry shortly",
                           type="server_busy", code="queue_full", headers={"Retry-After": "1"}) from None

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job, or stop its answer at the next round (one decode step)."""
        with self._lock:
            if job.cancelled.is_set() or job.finished.is_set():
                return
            job.cancelled.set()
            self.cancelled += 1

    @property
    def pending(self) -> int:
        return self.jobs.qsize() + len(self.running)

    def _loop(self) -> None:
        while True:
            self._take_jobs()
            for job, answer in list(self.running):
                self._advance(job, answer)

    def _take_jobs(self) -> None:
        """Start queued jobs while there is room; wait for one when nothing runs."""
        while len(self.running) < self.parallel:
            try:
                job = self.jobs.get(block=not self.running)
            except queue.Empty:
                return
            if job.cancelled.is_set():
                continue
            if not inspect.isgeneratorfunction(job.run):
                self._settle(job, lambda: ("done", job.run()))
                continue
            answer = job.run()
            self.running.append((job, answer))
            self._advance(job, answer)  # up to its first yield: role selected, request queued, nothing evaluated

    def _advance(self, job: Job, answer: Generator) -> None:
        """One piece of one answer (its first piece also selects its role and submits its sequence)."""
        if job.cancelled.is_set():
            self._end(job, answer)
            return

        def next_piece():
            try:
                piece = next(answer)
            except StopIteration as done:
                self._end(job, answer)
                return "done", done.value
            if job.streaming and piece is not None:  # None: the job only started
                job.put("piece", piece)
            return None

        self._settle(job, next_piece, on_error=lambda: self._end(job, answer))

    def _settle(self, job: Job, step: Callable[[], tuple[str, object] | None], on_error=None) -> None:
        """Run ``step``; send its outcome (if any) to the client; a failure ends the job with its error."""
        try:
            outcome = step()
        except (APIError, EdgeloraError) as exc:
            outcome = ("error", api_error(exc))
        except Exception as exc:  # a bug of ours: say so, keep serving
            outcome = ("error", APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))
        if outcome is None:
            return
        if outcome[0] == "error" and on_error is not None:
            on_error()
        job.finished.set()
        job.put(*outcome)
        with self._lock:
            self.served += 1

    def _end(self, job: Job, answer: Generator) -> None:
        if (job, answer) in self.running:
            self.running.remove((job, answer))
            answer.close()  # a cancelled answer's sequence is released now, its cells kept for reuse
