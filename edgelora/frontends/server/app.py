"""`edgelora serve`: an OpenAI-compatible HTTP server where every request picks its role.

One process, one loaded base, one engine. Requests wait in a bounded queue and a single worker
thread serves them in arrival order, each inside ``engine.session()``: its role's adapters are
applied and its answer generated with no other request in between, so no answer is ever computed
partly under another request's adapters. The engine's per-adapter-set KV states keep a returning
multi-turn client fast when others with other roles came in between.

The request's ``model`` names the role: ``base``, ``auto``, ``pirate``, or a stack
``pirate:0.7+terse:0.3``. llama-server's ``/lora-adapters`` and per-request ``lora`` work too.
Starlette + uvicorn for HTTP, sse-starlette for server-sent events; this module only maps
requests onto ``session.Roles``, the same object `ask` and the TUI use.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgelora.frontends.server import extras
from edgelora.safety import admission
from edgelora.runtime.engine import Engine
from edgelora.errors import EdgeloraError
from edgelora.models.gguf_info import validate_adapter
from edgelora.roles.residency import verify_adapter_file
from edgelora.roles.manifest import BASE_ROLE, Resolved, RoleCatalog, RoleError, UnknownRoleError
from edgelora.frontends.server.requests import MAX_BODY_BYTES, APIError, _parse_json, _read_body, read_json  # noqa: F401 (APIError, read_json: also imported from here)
from edgelora.roles.session import AUTO, Active, Roles, default_folders

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
MAX_STOP = 4
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # everything else changes state or generates


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


def api_error(exc: Exception) -> APIError:
    """Our typed errors as OpenAI-style 4xx errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RoleError):
        unknown = isinstance(exc, UnknownRoleError)
        return APIError(404 if unknown else 400, str(exc), code="model_not_found" if unknown else None, param="model")
    code = "context_length_exceeded" if "the context holds" in str(exc) else None
    return APIError(400, str(exc), code=code)


# ---------------------------------------------------------------------------- request parsing


def _number(body: dict, key: str, lo: float, hi: float, *, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    finite = not isinstance(value, float) or math.isfinite(value)  # an int of any size compares exactly
    if isinstance(value, bool) or not ok or not finite or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{key}' must be {kind} from {lo:g} to {hi:g}, got {value!r}", param=key)
    return value


def sampling_from(body: dict, n_ctx: int) -> dict:
    """The OpenAI sampling fields (and llama.cpp's extras) mapped onto the engine's, bounded."""
    n = body.get("n")  # null, like absent, means the default everywhere (as OpenAI's API)
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(400, "'n' must be 1: one answer per request", param="n")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop)):
        raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    sampling = {
        # above the room left in the context: the engine stops there, finish_reason "length"
        "max_tokens": _number({"max_tokens": max_tokens}, "max_tokens", 1, 1 << 24, integer=True),
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "top_k": _number(body, "top_k", 0, 1 << 20, integer=True),
        "min_p": _number(body, "min_p", 0, 1),
        "repeat_penalty": _number(body, "repeat_penalty", 0, 10),
        "seed": _number(body, "seed", 0, 2**32 - 1, integer=True),
        "stop": stop,
    }
    return {k: v for k, v in sampling.items() if v is not None}


def messages_from(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: 'role' must be system, user or assistant", param="messages")
        content = m.get("content")
        if content is None and m["role"] == "assistant":  # OpenAI's assistant turns may carry no content
            content = ""
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}]: 'content' must be a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def prompt_from(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
    return prompt


# ---------------------------------------------------------------------------- the service


class Service:
    """The HTTP surface's state: engine, roles, worker, llama-server-style default scales."""

    def __init__(self, engine: Engine, roles: Roles, *, max_queue: int = 16, extra_manifests=(),
                 fallback_role: str | None = None):
        self.engine = engine
        self.fallback_role = fallback_role  # answers for model names no role has (extras.fallback_note)
        self.roles = roles
        self.extra = list(extra_manifests)
        self.worker = Worker(engine, max_queue)
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

    def select(self, model: object, lora: object, prompt_for_route: str) -> Active:
        """Apply the adapters a request asks for (worker thread, engine held). Returns what answered."""
        roles = self.roles
        if lora is not None:
            resolved = self._by_ids(_lora_scales(lora))
        elif model in (None, "", self.model_id, "default"):
            resolved = self._by_ids(self.default_scales)
        elif not isinstance(model, str):
            raise APIError(400, "'model' must be a string naming a role", param="model")
        elif model == AUTO:
            chosen = roles.route(prompt_for_route)
            active = Active(roles.catalog.resolve([chosen.role]), chosen)
            roles.registry.apply(active.resolved)
            roles.current, roles.specs = active, [BASE_ROLE]  # routed here, once; Roles must not route again
            return active
        else:
            resolved = roles.catalog.resolve([s.strip() for s in model.split("+")])
        roles.registry.apply(resolved)
        roles.current = Active(resolved)
        roles.specs = [BASE_ROLE]  # explicit: never route inside Roles
        return roles.current

    def reload(self) -> dict:
        """Re-read the roles folders (worker thread: the request in flight has finished). A role
        whose new version fails its checks, or whose manifest no longer parses, keeps its old
        version; versions no role uses any more are freed."""
        old = self.roles.catalog
        new = RoleCatalog(default_folders(self.roles.config), manifests=self.extra)
        refused = {}
        for name, paths in old.found.items():  # a manifest being rewritten, or broken: keep the old role
            for path in paths:
                if path not in new._roles and path.exists():
                    refused[name] = next((e for e in new.errors if str(path) in e), f"{path}: no longer loads")
        for role in new.roles():
            try:
                self.admit(role)
            except EdgeloraError as exc:
                refused[role.name] = str(exc)
        for name in refused:
            for path in new.found.pop(name, []):
                new._roles.pop(path, None)
            if name in old.found and name not in old.collisions():
                kept = old.get(name)
                new._roles[kept.path] = kept
                new.found[name] = [kept.path]
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
            verify_adapter_file(adapter, self.roles.config)
            info = validate_adapter(adapter.file, self.engine.base)
            if not registry.force:
                admission.check_base(info, self.engine.model_path, adapter.file)

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
        if lora is not None:
            _lora_scales(lora)
        elif model not in (None, "", self.model_id, "default", AUTO):
            try:
                self.roles.catalog.resolve([s.strip() for s in model.split("+")])
            except RoleError as exc:
                raise extras.with_fallback_hint(api_error(exc)) from None

    def chat_job(self, body: dict) -> Callable:
        served, fallback = extras.with_fallback(self, body)
        self.check_request(served)
        messages = messages_from(body)
        sampling = sampling_from(body, self.engine.llama.n_ctx())
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")

        def run(emit):
            active = self.select(served.get("model"), body.get("lora"), last_user)
            extras.note_answer(run, body.get("model"), active, fallback)
            for piece in self.roles.stream_chat(messages, **sampling):
                emit(piece)
            return self._result(active, fallback)

        return run

    def completion_job(self, body: dict) -> Callable:
        served, fallback = extras.with_fallback(self, body)
        self.check_request(served)
        prompt = prompt_from(body)
        sampling = sampling_from(body, self.engine.llama.n_ctx())

        def run(emit):
            active = self.select(served.get("model"), body.get("lora"), prompt)
            extras.note_answer(run, body.get("model"), active, fallback)
            merged = {**active.resolved.sampling, **sampling}
            for piece in self.engine.stream_complete(prompt, **merged):
                emit(piece)
            return self._result(active, fallback)

        return run

    def _result(self, active: Active, fallback: dict | None = None) -> dict:
        out = self.engine.last
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


def _lora_scales(lora: object) -> dict[int, float]:
    if not isinstance(lora, list):
        raise APIError(400, "'lora' must be a list of {\"id\": N, \"scale\": S}", param="lora")
    scales = {}
    for item in lora:
        if not isinstance(item, dict) or not isinstance(item.get("id"), int) or isinstance(item.get("id"), bool):
            raise APIError(400, "'lora' items need an integer 'id'", param="lora")
        scale = _number(item, "scale", -4, 4)
        scales[item["id"]] = 1.0 if scale is None else float(scale)
    return scales


# ---------------------------------------------------------------------------- HTTP


def build_app(service: Service, *, api_key: str | None = None, allowed_hosts: list[str] | None = None,
              cors_origins: list[str] | None = None, request_log: bool = False) -> Starlette:
    def chunk_base(kind: str, model) -> dict:
        return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": model}

    async def respond(kind: str, request: Request, body: dict, run):
        """One JSON object, or SSE chunks ending in [DONE]; chat and completions differ only in the
        shape of a choice."""
        base = chunk_base(kind, body.get("model") or service.model_id)
        chat = kind == "chat"
        if body.get("stream"):
            first = [True]

            def piece(text):
                base["model"] = extras.response_model(run, body.get("model"), base["model"])  # 'auto': the routed role
                choice = {"text": text}
                if chat:
                    choice = {"delta": {"role": "assistant", "content": text} if first[0] else {"content": text}}
                    first[0] = False
                return {**base, "choices": [{"index": 0, **choice, "finish_reason": None}]}

            def finish(result):
                extras.log_answer(service, request, result)
                base["model"] = extras.response_model(run, body.get("model"), base["model"])
                choice = {"delta": {}} if chat else {"text": ""}
                return {**base, "choices": [{"index": 0, **choice, "finish_reason": result["finish_reason"]}],
                        "edgelora": result["edgelora"]}

            def usage(result):
                return {**base, "choices": [], "usage": result["usage"]}

            include = bool((body.get("stream_options") or {}).get("include_usage"))
            events = await service.stream_job(run, request, piece, finish, usage, include)
            return EventSourceResponse(events, ping=15) if events is not None else Response(status_code=499)
        result = await service.run_job(run, request)
        if result is None:
            return Response(status_code=499)  # the client went away: nobody reads this
        extras.log_answer(service, request, result)
        base["model"] = extras.response_model(run, body.get("model"), base["model"])
        choice = {"message": {"role": "assistant", "content": result["text"]}} if chat else {"text": result["text"]}
        return JSONResponse({**base, "object": "chat.completion" if chat else "text_completion",
                             "choices": [{"index": 0, **choice, "finish_reason": result["finish_reason"]}],
                             "usage": result["usage"], "edgelora": result["edgelora"]})

    async def chat_completions(request: Request):
        body = await read_json(request)
        return await respond("chat", request, body, service.chat_job(body))

    async def completions(request: Request):
        body = await read_json(request)
        return await respond("completion", request, body, service.completion_job(body))

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": extras.model_rows(service)})

    async def health(request: Request):
        w = service.worker
        return JSONResponse({"status": "ok", "queue": w.pending, "served": w.served, "cancelled": w.cancelled,
                             "model": service.model_id})

    async def lora_adapters(request: Request):
        if request.method == "POST":
            body = await _json_any(request)
            scales = _lora_scales(body)
            table = {i for i, _, _ in service.adapter_table()}
            unknown = [i for i in scales if i not in table]
            if unknown:
                raise APIError(400, f"unknown lora id(s) {unknown}", param="id")
            service.default_scales = {i: s for i, s in scales.items() if s != 0}
        return JSONResponse([{"id": i, "path": str(a.file), "scale": service.default_scales.get(i, 0.0), "role": r.name}
                             for i, a, r in service.adapter_table()])

    async def roles_list(request: Request):
        return JSONResponse({"roles": service.role_report(), "resident_bytes": service.roles.registry.resident_bytes})

    async def roles_reload(request: Request):
        return JSONResponse(await service.run_job(lambda emit: service.reload()))

    async def role_action(request: Request):
        name, action = request.path_params["name"], request.path_params["action"]

        def run(emit):
            resolved = service.roles.catalog.resolve([name])
            if action == "preload":
                service.roles.registry.preload(resolved)
            elif action == "evict":
                evicted = extras.evict_role(service, resolved)  # says what stayed resident and why
                return {"role": name, "action": action, **evicted, "roles": service.role_report()}
            else:
                raise APIError(404, f"unknown action '{action}' (preload, evict)")
            return {"role": name, "action": action, "roles": service.role_report()}

        return JSONResponse(await service.run_job(run))

    async def on_api_error(request: Request, exc: APIError):
        return exc.response()

    async def on_http_error(request: Request, exc):
        return APIError(exc.status_code, str(exc.detail), type="invalid_request_error").response()

    async def on_bug(request: Request, exc: Exception):  # ours, not the client's: still an OpenAI-style body
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()

    from starlette.exceptions import HTTPException

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/lora-adapters", lora_adapters, methods=["GET", "POST"]),
        Route("/v1/roles", roles_list, methods=["GET"]),
        Route("/v1/roles/reload", roles_reload, methods=["POST"]),
        Route("/v1/roles/{name}/{action}", role_action, methods=["POST"]),
        *extras.extra_routes(service),  # llama-server's native endpoints, /v1/models/{id}, the web page
    ]
    middleware = [Middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts, cors_origins=cors_origins)]
    if request_log:
        middleware.insert(0, Middleware(extras.RequestLog))
    if cors_origins:
        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                        allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_bug})


async def _json_any(request: Request):
    return _parse_json(await _read_body(request))


class Guard:
    """Host header (no DNS rebinding from a browser page), Origin and Content-Type of requests that
    change state or generate (no cross-site requests from a browser page), API key, and declared
    body size."""

    def __init__(self, app, api_key: str | None, allowed_hosts: list[str] | None, cors_origins: list[str] | None = None):
        self.app = app
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts  # None: any host (a key is required then)
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins or ()}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._check(scope, headers)
        if problem is not None:
            return await problem.response()(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, scope, headers) -> APIError | None:
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")) not in self.allowed_hosts:
            return APIError(400, f"Host '{headers.get('host', '')}' is not this server; use one of "
                                 f"{', '.join(self.allowed_hosts)}", code="bad_host")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
        if scope["method"] not in SAFE_METHODS:
            problem = self._cross_site(scope, headers)
            if problem is not None:
                return problem
        if self.api_key and scope["method"] != "OPTIONS" and not _public(scope):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                type="authentication_error", code="invalid_api_key")
        return None

    def _cross_site(self, scope, headers) -> APIError | None:
        """A web page can make a browser send a "simple" POST anywhere, the Host header naming this
        server and no preflight: refuse it unless its Origin is this server's own or one allowed by
        --cors-origin; and refuse a body not declared JSON (a form or text/plain, what such a
        request can carry without a preflight)."""
        origin = headers.get("origin")
        if origin is None and headers.get("sec-fetch-site") == "cross-site":
            origin = "null"  # a cross-site request whose origin the browser kept back
        if origin is not None and not self._origin_allowed(origin, scope, headers):
            return APIError(403, f"requests from the web page at Origin '{origin}' are refused; allow that origin "
                                 f"with `edgelora serve --cors-origin {origin}`", type="permission_error",
                            code="bad_origin")
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if has_body and media_type != "application/json":
            return APIError(415, f"the request body must be sent as Content-Type: application/json "
                                 f"(got '{media_type or 'none'}')", code="unsupported_media_type")
        return None

    def _origin_allowed(self, origin: str, scope, headers) -> bool:
        origin = origin.rstrip("/").lower()
        own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()  # a page this server served
        return origin == own or origin in self.cors_origins or "*" in self.cors_origins


def _public(scope) -> bool:
    """What needs no API key: /health, and the web page's own files (nothing secret in them; a browser
    cannot send a key when it opens a URL, so the page asks for it and sends it on its API calls)."""
    path = scope["path"]
    return path == "/health" or (scope["method"] in ("GET", "HEAD") and (path == "/" or path.startswith("/web/")))


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_hosts(host: str) -> list[str]:
    return sorted({host, "localhost", "127.0.0.1", "[::1]"})
