"""`edgelora serve`: an OpenAI-compatible HTTP server where every request picks its role.

One process, one loaded base, one engine. Requests wait in a bounded queue and a single worker
thread serves them in arrival order, each inside ``engine.session()``: its role's adapters are
applied and its answer generated with no other request in between, so no answer is ever computed
partly under another request's adapters. The engine's per-adapter-set KV states keep a returning
multi-turn client fast when others with other roles came in between.

The request's ``model`` names the role: ``base``, ``auto``, ``pirate``, or a stack
``pirate:0.7+terse:0.3``. llama-server's ``/lora-adapters`` and per-request ``lora`` work too.
Starlette + uvicorn for HTTP, sse-starlette for server-sent events. This module holds the routes,
build_app and the Guard; service.py the Service (the model owner, which answers by the one turn of
conversation/turn.py, as `ask` and the TUI do); worker.py the queue and its thread; requests.py the
request fields and the mapping of typed errors to HTTP statuses.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
import uuid

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgelora.frontends.server import extras
from edgelora.frontends.server.requests import (MAX_BODY_BYTES, APIError, _lora_scales, _parse_json,  # noqa: F401
                                               _read_body, api_error, read_json, sampling_from)
from edgelora.frontends.server.service import DISCONNECT_POLL_S, Service  # noqa: F401 (imported from here)
from edgelora.frontends.server.worker import Job, Worker  # noqa: F401 (imported from here)
from edgelora.roles.selection import is_manifest_path

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # everything else changes state or generates


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
        return JSONResponse(await service.run_job(service.reload))

    async def role_action(request: Request):
        name, action = request.path_params["name"], request.path_params["action"]

        def run():
            if is_manifest_path(name):  # a role name, never a file of the client's choice
                raise APIError(404, f"unknown role '{name}'", code="model_not_found")
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
