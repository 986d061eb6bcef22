"""The server's model owner: the engine, the roles, the one worker, llama-server-style default
scales. Every answer is made by the one turn (conversation/turn.py) inside the worker, up to
``engine.parallel`` at once (each a scheduler sequence); roles are chosen and reloaded through
Roles' and RoleCatalog's public methods."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from starlette.requests import Request

from edgelora.conversation.turn import Turn
from edgelora.errors import RoleError
from edgelora.frontends.server import extras
from edgelora.frontends.server.requests import (APIError, _lora_scales, api_error, messages_from, prompt_from,
                                               sampling_from)
from edgelora.frontends.server.worker import Job, Worker
from edgelora.safety import admission
from edgelora.roles.manifest import Resolved
from edgelora.roles.selection import Selection, parse_selection
from edgelora.roles.session import Active, Roles
from edgelora.runtime.engine import Engine
from edgelora.runtime.generate import Completion

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


class Service:
    """The HTTP surface's state: engine, roles, worker, llama-server-style default scales."""

    def __init__(self, engine: Engine, roles: Roles, *, max_queue: int = 16, extra_manifests=(),
                 fallback_role: str | None = None):
        self.engine = engine
        self.fallback_role = fallback_role  # answers for model names no role has (extras.fallback_note)
        self.roles = roles
        self.extra = list(extra_manifests)
        engine.scheduler.watch_prompts = False  # answers stop between decode steps (scheduler.py says why)
        self.worker = Worker(engine, max_queue, parallel=engine.parallel)
        self.created = int(time.time())
        self.default_scales: dict[int, float] = {}  # POST /lora-adapters: id -> scale, for requests naming no role
        self.model_id = engine.model_path.name

    # ------------------------------------------------------------ roles and adapters

    def adapter_table(self) -> list[tuple[int, object, object]]:
        """(id, RoleAdapter, Role) for every adapter of every role: llama-server's adapter ids."""
        rows = []
        for role in self.roles.catalog.roles():
            for adapter in role.adapters:
                rows.append((len(rows), adapter, role))
        return rows

    def _by_ids(self, scales: dict[int, float]) -> Resolved:
        table = {i: (a, r) for i, a, r in self.adapter_table()}
        unknown = [i for i in scales if i not in table]
        if unknown:
            raise APIError(400, f"unknown lora id(s) {unknown}; GET /lora-adapters lists them", param="lora")
        picked = [(table[i][0], s, table[i][1]) for i, s in scales.items() if s != 0]
        names = [(f"{table[i][1].name}", s) for i, s in scales.items() if s != 0]
        return Resolved(roles=names, adapters=picked, system=None, sampling={})

    def selection_for(self, model: object, lora: object) -> Selection | Resolved:
        """What a request asks to answer with: llama-server's lora ids or default scales, or the
        role selection its ``model`` names (the one grammar, as `ask --role`)."""
        if lora is not None:
            return self._by_ids(_lora_scales(lora))
        if model in (None, "", self.model_id, "default"):
            return self._by_ids(self.default_scales)
        if not isinstance(model, str):
            raise APIError(400, "'model' must be a string naming a role", param="model")
        selection = parse_selection(model)
        if selection.manifests:  # a client must not make the server read files of its choice
            raise APIError(400, f"'model' {model!r}: manifest paths are not taken over HTTP; add the role "
                                "(`edgelora roles add`, a roles folder) and name it", param="model")
        return selection

    def reload(self) -> dict:
        """Re-read the roles folders (worker thread: the request in flight has finished). A role
        whose new version fails its checks, or whose manifest no longer parses, keeps its old
        version; versions no role uses any more are freed."""
        old = self.roles.catalog
        new, refused = old.reload(admit=self.admit)
        changed = sorted(n for n in new.names() if n not in refused and (
            n not in old.found or n in old.collisions() or _fingerprint(old.get(n)) != _fingerprint(new.get(n))))
        ids = {i: a.sha256 for i, a, _ in self.adapter_table()}
        self.roles.catalog = new
        # POST /lora-adapters scales follow their adapter, whatever its new id
        by_sha = {a.sha256: i for i, a, _ in reversed(self.adapter_table())}
        self.default_scales = {by_sha[ids[i]]: s for i, s in self.default_scales.items() if ids.get(i) in by_sha}
        live = {a.sha256 for r in new.roles() for a in r.adapters}
        for role in old.roles():
            for adapter in role.adapters:
                if adapter.sha256 not in live:
                    self.roles.registry.release(adapter)  # an old version, unless still active
        return {"reloaded": changed, "refused": refused, "roles": new.names(), "problems": new.errors}

    def admit(self, role) -> None:
        """The checks a role's adapters pass when loaded (sha256 pin, signature, the base it was
        made for, structure against the loaded base), run now so a bad version is refused at
        reload, not at its first request. Loading checks it all again."""
        registry = self.roles.registry
        registry.check_base(role)
        for adapter in role.adapters:
            with admission.admitted(adapter.file, self.engine.base, self.engine.model_path, self.roles.config,
                                    sha256=adapter.sha256, force=registry.force):
                pass

    def role_report(self) -> list[dict]:
        resident = {a.sha256: name for name, a in self.engine.resident.items()}  # by version, not by path
        active = self.engine.active
        rows = []
        for role in self.roles.catalog.roles():
            files = [resident.get(a.sha256) for a in role.adapters]
            rows.append({"name": role.name, "description": role.description,
                         "resident": bool(files) and all(files), "active": bool(files) and all(f in active for f in files),
                         "adapters": [{"file": str(a.file), "sha256": a.sha256, "scale": a.scale} for a in role.adapters]})
        return rows

    # ------------------------------------------------------------ generation jobs

    def check_request(self, body: dict) -> None:
        """What can be refused before queueing: the field types, and a role the catalog does not
        know (checked again when the request runs: a reload may come in between)."""
        if body.get("stream") is not None and not isinstance(body["stream"], bool):
            raise APIError(400, "'stream' must be true or false", param="stream")
        if not isinstance(body.get("stream_options") or {}, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        model, lora = body.get("model"), body.get("lora")
        if model is not None and not isinstance(model, str):
            raise APIError(400, "'model' must be a string naming a role", param="model")
        try:
            selection = self.selection_for(model, lora)
            if isinstance(selection, Selection) and not selection.is_auto:
                self.roles.catalog.resolve(selection)
        except RoleError as exc:
            raise extras.with_fallback_hint(api_error(exc)) from None

    def chat_job(self, body: dict) -> Callable:
        served, fallback = extras.with_fallback(self, body)
        self.check_request(served)
        messages = messages_from(body)
        sampling = sampling_from(body, self.engine.llama.n_ctx())
        return self._turn_job(body, served, fallback, messages=messages, sampling=sampling)

    def completion_job(self, body: dict) -> Callable:
        served, fallback = extras.with_fallback(self, body)
        self.check_request(served)
        prompt = prompt_from(body)
        sampling = sampling_from(body, self.engine.llama.n_ctx())
        return self._turn_job(body, served, fallback, prompt=prompt, sampling=sampling)

    def _turn_job(self, body: dict, served: dict, fallback: dict | None, **turn) -> Callable:
        """A job that answers by the one turn (conversation/turn.py), as `ask` and the TUI do."""

        def run():
            selection = self.selection_for(served.get("model"), body.get("lora"))  # again: a reload may have come
            answer = Turn(self.roles, selection=selection, **turn)
            answer.start(on_start=lambda t: extras.note_answer(run, body.get("model"), t.active, fallback))
            try:
                yield None  # queued: the worker starts every arrived job before the next decode
                yield from answer.stream()
            finally:
                answer.close()
            return self._result(answer.completion, answer.active, fallback)

        return run

    def _result(self, out: Completion, active: Active, fallback: dict | None = None) -> dict:
        result = {
            "text": out.text,
            "finish_reason": "length" if out.finish_reason == "length" else "stop",
            "cancelled": out.finish_reason == "cancelled",
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": out.cached_tokens}},
            "edgelora": {"role": active.label, "adapters": self.roles.adapter_report(),
                         "route": {"role": active.route.role, "reason": active.route.reason} if active.route else None,
                         "ttft_s": round(out.ttft_s, 4), "tokens_per_s": round(out.tokens_per_s, 2)},
        }
        if fallback:
            result["edgelora"]["fallback"] = fallback
        return result

    async def _next_event(self, job: Job, request: Request | None) -> tuple[str, object] | None:
        """The job's next event, or None when the client went away first (the job is cancelled:
        dropped from the queue, or stopped within a token)."""
        try:
            while True:
                try:
                    return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        self.worker.cancel(job)
                        return None
        except asyncio.CancelledError:
            self.worker.cancel(job)
            raise

    async def run_job(self, run, request: Request | None = None) -> dict | None:
        """Queue a job and wait for its result (no streaming); None if the client went away."""
        job = Job(run, asyncio.get_running_loop())
        self.worker.submit(job)
        while True:
            event = await self._next_event(job, request)
            if event is None:
                return None
            kind, value = event
            if kind == "done":
                return value
            if kind == "error":
                raise value

    async def stream_job(self, run, request: Request, make_chunk, finish_chunk, usage_chunk, include_usage: bool):
        """Queue a job and wait for its first event, so that a refused request (adapter, context)
        is still a 4xx; then an async generator of SSE data strings. A disconnect cancels the job."""
        job = Job(run, asyncio.get_running_loop(), streaming=True)
        self.worker.submit(job)  # a full queue fails here, before the 200 is sent
        first = await self._next_event(job, request)
        if first is None:
            return None
        if first[0] == "error":
            raise first[1]

        async def events():
            event = first
            try:
                while True:
                    kind, value = event if event is not None else await job.events.get()
                    event = None
                    if kind == "piece":
                        yield json.dumps(make_chunk(value))
                    elif kind == "done":
                        yield json.dumps(finish_chunk(value))
                        if include_usage:
                            yield json.dumps(usage_chunk(value))
                        yield "[DONE]"
                        return
                    else:
                        yield json.dumps({"error": {"message": value.message, "type": value.type, "code": value.code}})
                        yield "[DONE]"
                        return
            finally:  # normal end, or the client went away (the generator is cancelled/closed)
                self.worker.cancel(job)

        return events()


def _fingerprint(role) -> tuple:
    return (tuple((a.sha256, a.scale) for a in role.adapters), tuple(role.include), role.system,
            tuple(sorted(role.sampling.items())))
