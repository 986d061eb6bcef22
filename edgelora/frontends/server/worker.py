"""The server's one worker thread: a bounded FIFO of jobs, served one at a time inside
``engine.session()``, so no answer is ever computed partly under another request's adapters."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from edgelora.errors import EdgeloraError
from edgelora.frontends.server.requests import APIError, api_error
from edgelora.runtime.engine import Engine


@dataclass
class Job:
    """One unit of work for the worker: ``run(emit)`` executes inside engine.session()."""

    run: Callable[[Callable[[str], None]], dict]
    loop: asyncio.AbstractEventLoop
    streaming: bool = False  # pieces are sent to the client as they come; otherwise only the result
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def put(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    """A bounded FIFO of jobs served one at a time by one thread that owns the engine."""

    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.current: Job | None = None
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
        """The client went away: drop the job, or stop its generation within a token."""
        with self._lock:
            if job.cancelled.is_set() or job.finished.is_set():
                return
            job.cancelled.set()
            if self.current is job:
                self.engine.cancel()
                self.cancelled += 1

    @property
    def pending(self) -> int:
        return self.jobs.qsize() + (self.current is not None)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            with self._lock:
                if job.cancelled.is_set():
                    self.cancelled += 1
                    continue
                self.current = job
            try:
                with self.engine.session():
                    result = job.run(lambda piece: job.put("piece", piece) if job.streaming else None)
                job.finished.set()
                job.put("done", result)
            except (APIError, EdgeloraError) as exc:
                job.put("error", api_error(exc))
            except Exception as exc:  # a bug of ours: say so, keep serving
                job.put("error", APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))
            finally:
                job.finished.set()
                with self._lock:
                    self.current = None
                    self.served += 1
