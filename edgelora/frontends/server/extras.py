"""What `edgelora serve` offers beyond the OpenAI routes of server.py: llama-server's native
endpoints (/props, /slots, /metrics, /tokenize, /detokenize, /completion), /v1/models/{id}, a
fallback role for model names the catalog does not know, the per-request log line, and the web
page at ``/`` (static files in edgelora/web, no build step, nothing from a CDN).

server.py calls in here with small hooks; everything llama-server-shaped lives in this module."""

from __future__ import annotations

import sys
import threading
import time
from urllib.parse import quote
from dataclasses import dataclass, field
from pathlib import Path

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edgelora.roles.manifest import BASE_ROLE, RoleError, UnknownRoleError
from edgelora.frontends.server.requests import APIError, read_json
from edgelora.roles.selection import AUTO, parse_selection

WEB_DIR = Path(__file__).parent / "web"
WEB_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# The page loads only its own files and talks only to this server.
# No other site may frame it (clickjacking its Send and Stop buttons).
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
LOG_PATH_SAFE = "/:@!$&'()*+,;=~"  # what stays as is in a logged path; the rest is %-quoted, as uvicorn's access log
QUIET_PATHS = {"/health", "/metrics", "/", "/favicon.ico"}  # polled or static: not worth a log line


# ---------------------------------------------------------------------------- fallback role


def fallback_note(service, model: object) -> dict | None:
    """For a name the catalog does not know (a client hard-wired to 'gpt-4o-mini' or Ollama's
    'llama3:8b'), the fallback role that answers instead, when the operator set one. Stacks (a+b)
    never fall back, nor a known role with a weight ('pirate:0.5', 'pirate:abc'): that grammar is
    ours, so a typo in it is the user's to see."""
    fallback = getattr(service, "fallback_role", None)
    if not fallback or not isinstance(model, str) or "+" in model:
        return None
    if model in (None, "", service.model_id, "default", AUTO, BASE_ROLE):
        return None
    if not _unknown_name(service.roles.catalog, model):
        return None
    return {"requested": model, "role": fallback,
            "note": f"no role named '{model}': answered by the fallback role '{fallback}' (serve --fallback-role)"}


def _unknown_name(catalog, model: str) -> bool:
    """No role answers to this name, read as 'name' or 'name:weight'."""
    name = model.rpartition(":")[0] or model
    try:
        selection = parse_selection(model)
        if selection.manifests:  # refused as such (no file is read for a client), not answered by the fallback
            return False
        catalog.resolve(selection)
        return False
    except UnknownRoleError as exc:  # not a known role that includes an unknown one: the operator's to fix
        return exc.name in (model, name)
    except RoleError:  # 'llama3:8b': no weight after ':', so no stack of ours unless the name is a role
        return name != BASE_ROLE and name not in catalog.names()


def with_fallback(service, body: dict) -> tuple[dict, dict | None]:
    """The body to serve (model replaced by the fallback role when it applies) and the note."""
    if body.get("lora") is not None:  # llama-server's per-request adapters decide, not the name
        return body, None
    note = fallback_note(service, body.get("model"))
    return ({**body, "model": note["role"]}, note) if note else (body, None)


def with_fallback_hint(error):
    """A 404 for an unknown model says how to make such names answer."""
    if error.status == 404:
        error.message += "; `edgelora serve --fallback-role ROLE` (config fallback_role) answers unknown names with ROLE"
    return error


def check_fallback_role(catalog, name: str | None) -> None:
    """At start: the fallback role must exist (one line naming the flag/key otherwise)."""
    if name and name != AUTO:  # 'auto': unknown names are routed like model="auto"
        catalog.resolve([name])  # RoleError: unknown role 'x' (known: ...)


def check_cors_origins(origins, api_key: str | None) -> str | None:
    """'*' lets every web site a visitor opens drive the server from their browser: only behind a
    key, which a page cannot send without being given it."""
    if "*" in origins and not api_key:
        return "'*' would let every web site drive this server from its visitors' browsers; name the origins, or set --api-key"
    return None


# ---------------------------------------------------------------------------- the answer's model and log line


def note_answer(run, model: object, active, fallback: dict | None) -> None:
    """Worker thread, once the role is chosen: remember on the job's own function (never on the
    client's body) which role answers when the request did not name it ('auto', or a fallback)."""
    if model == AUTO or fallback:
        run.answered_by = active.label


def response_model(run, requested: object, default: str) -> str:
    """The response's `model`: the role that answered for 'auto' and for a fallback, otherwise
    what the client asked for, as OpenAI servers echo it."""
    answered = getattr(run, "answered_by", None)
    return answered or (requested if isinstance(requested, str) and requested else default)


@dataclass
class Stats:
    """Counters for /metrics, updated once per finished generation."""

    requests: dict = field(default_factory=dict)  # role label -> count
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, role: str, usage: dict, seconds: float) -> None:
        with self.lock:
            self.requests[role] = self.requests.get(role, 0) + 1
            self.prompt_tokens += usage.get("prompt_tokens", 0)
            self.completion_tokens += usage.get("completion_tokens", 0)
            self.generation_s += seconds


def stats_of(service) -> Stats:
    if not hasattr(service, "stats"):
        service.stats = Stats()
    return service.stats


def log_answer(service, request: Request, result: dict) -> None:
    """Count the answer for /metrics and hand its role and tokens to the request log line."""
    usage, info = result.get("usage", {}), result.get("edgelora", {})
    role = info.get("role", "?")
    rate = info.get("tokens_per_s") or 0
    seconds = info.get("ttft_s", 0) + (usage.get("completion_tokens", 0) / rate if rate else 0)
    stats_of(service).add(role, usage, seconds)
    request.scope.setdefault("state", {})["edgelora_log"] = (
        f"role={role} tokens={usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} "
        f"finish={result.get('finish_reason', '?')}")


class RequestLog:
    """One line per request on stderr: time, method, path, status, role, tokens, milliseconds.
    `serve --quiet` leaves it out."""

    def __init__(self, app, stream=None):
        self.app = app
        self.stream = stream

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS or scope["path"].startswith("/web/"):
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["edgelora_t0"] = t0
        status = [0]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self._write(scope, status[0], state, t0)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            status[0] = status[0] or 500
            raise
        finally:  # no final body sent: the client went away (499), or the app failed (500)
            self._write(scope, status[0] or 499, state, t0)

    def _write(self, scope, status: int, state: dict, t0: float) -> None:
        if state.get("edgelora_logged"):
            return
        state["edgelora_logged"] = True
        ms = (time.perf_counter() - t0) * 1000
        extra = state.get("edgelora_log", "")
        path = quote(scope["path"], safe=LOG_PATH_SAFE)  # decoded by uvicorn: any web page can put ESC in it
        line = printable(f"{time.strftime('%H:%M:%S')} {scope['method']} {path} {status} "
                         f"{extra + ' ' if extra else ''}{ms:.0f} ms")
        stream = self.stream or sys.stderr
        try:
            print(line, file=stream, flush=True)
        except (OSError, ValueError):  # a closed terminal must not fail the request
            pass


def printable(text: str) -> str:
    """Control characters (terminal escapes, newlines) shown as escapes, never written raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


# ---------------------------------------------------------------------------- evicting a role


def evict_role(service, resolved) -> dict:
    """Free a role's resident adapters; the active ones stay (the next request may need them),
    and the answer says which and why instead of a silent 200."""
    registry, engine = service.roles.registry, service.engine
    resident = {a.sha256: name for name, a in engine.resident.items()}
    freed, kept = [], []
    for adapter, _, _ in resolved.adapters:
        name = resident.get(adapter.sha256)
        if name is None:
            continue
        (freed if registry.release(adapter) else kept).append(name)
    out = {"freed": freed, "kept": kept}
    if kept:
        out["note"] = (f"{', '.join(kept)} stayed resident: in use by the active role; it is freed when "
                       f"another role takes over and the residency limits need the room")
    return out


# ---------------------------------------------------------------------------- llama-server's endpoints


def model_rows(service) -> list[dict]:
    rows = [{"id": BASE_ROLE, "description": "the base model with no adapter"},
            {"id": AUTO, "description": "a role chosen per request from the prompt"}]
    rows += [{"id": r.name, "description": r.description} for r in service.roles.catalog.roles()]
    return [{"object": "model", "created": service.created, "owned_by": "edgelora", **row} for row in rows]


def extra_routes(service) -> list[Route]:
    engine = service.engine

    async def model_one(request: Request):
        wanted = request.path_params["model"]
        for row in model_rows(service):
            if row["id"] == wanted:
                return JSONResponse(row)
        raise APIError(404, f"unknown model '{wanted}'; GET /v1/models lists the roles", param="model",
                         code="model_not_found")

    async def props(request: Request):
        return JSONResponse({
            "default_generation_settings": {"n_ctx": engine.llama.n_ctx(), "params": _default_params()},
            "total_slots": engine.parallel,
            "model_path": str(engine.model_path),
            "chat_template": engine.llama.metadata.get("tokenizer.chat_template", ""),
            "modalities": {"vision": False, "audio": False},
            "build_info": f"edgelora {_version()}",
            "edgelora": {"roles": [BASE_ROLE, AUTO, *service.roles.catalog.names()],
                         "fallback_role": getattr(service, "fallback_role", None),
                         "threads": engine.threads.report() if engine.threads is not None else None},
        })

    async def slots(request: Request):
        w = service.worker
        return JSONResponse([{**slot, "n_ctx": engine.llama.n_ctx(), "queued": w.jobs.qsize()}
                             for slot in engine.scheduler.report()])

    async def metrics(request: Request):
        return PlainTextResponse(metrics_text(service), media_type="text/plain; version=0.0.4")

    async def tokenize(request: Request):
        body = await read_json(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise APIError(400, "'content' must be a string", param="content")
        ids = engine.tokenize(content, add_bos=bool(body.get("add_special", False)), special=True)
        if body.get("with_pieces"):
            return JSONResponse({"tokens": [{"id": t, "piece": _piece(engine, t)} for t in ids]})
        return JSONResponse({"tokens": ids})

    async def detokenize(request: Request):
        body = await read_json(request)
        tokens, n_vocab = body.get("tokens"), engine.llama.n_vocab()
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab
                                                    for t in tokens):
            raise APIError(400, f"'tokens' must be a list of token ids from 0 to {n_vocab - 1}", param="tokens")
        text = engine.llama.detokenize(tokens, special=True).decode("utf-8", errors="replace")
        return JSONResponse({"content": text})

    async def completion(request: Request):
        return await native_completion(service, request, await read_json(request))

    return [
        Route("/v1/models/{model:path}", model_one, methods=["GET"]),
        Route("/props", props, methods=["GET"]),
        Route("/slots", slots, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/completion", completion, methods=["POST"]),
    ] + web_routes()


def _piece(engine, token: int) -> str:
    return engine.llama.detokenize([token], special=True).decode("utf-8", errors="replace")


def _default_params() -> dict:
    from edgelora.runtime.sampling import SAMPLING_DEFAULTS

    params = {k: v for k, v in SAMPLING_DEFAULTS.items() if k not in ("max_tokens", "stop")}
    return {**params, "n_predict": -1, "stop": []}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgelora")
    except PackageNotFoundError:
        return "unknown"


def metrics_text(service) -> str:
    """Prometheus text format: llama-server's counter names where they mean the same, edgelora_* for ours."""
    stats, w = stats_of(service), service.worker
    with stats.lock:
        by_role = dict(stats.requests)
        rows = [
            ("llamacpp:prompt_tokens_total", "counter", "Prompt tokens processed.", stats.prompt_tokens),
            ("llamacpp:tokens_predicted_total", "counter", "Generated tokens.", stats.completion_tokens),
            ("llamacpp:requests_processing", "gauge", "Requests being answered.", len(w.running)),
            ("llamacpp:requests_deferred", "gauge", "Requests waiting in the queue.", w.jobs.qsize()),
            ("edgelora_generation_seconds_total", "counter", "Seconds spent answering.", round(stats.generation_s, 4)),
            ("edgelora_requests_cancelled_total", "counter", "Requests whose client went away.", w.cancelled),
            ("edgelora_resident_adapters", "gauge", "Adapters loaded in memory.", len(service.engine.resident)),
            ("edgelora_resident_bytes", "gauge", "Bytes of resident adapters.", service.roles.registry.resident_bytes),
        ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP edgelora_requests_total Answers by the role that gave them.",
              "# TYPE edgelora_requests_total counter"]
    lines += [f'edgelora_requests_total{{role="{_label_value(role)}"}} {n}' for role, n in sorted(by_role.items())]
    return "\n".join(lines) + "\n"


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------------------------------------------------------------------- /completion (llama-server native)


def openai_body_from_native(body: dict) -> dict:
    """llama-server's /completion fields mapped onto /v1/completions' (n_predict -1: to the context end)."""
    out = {k: body[k] for k in ("prompt", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed",
                                "stop", "stream", "model", "lora") if k in body}
    n_predict = body.get("n_predict")
    if n_predict is not None:
        if isinstance(n_predict, bool) or not isinstance(n_predict, int) or n_predict < -1 or n_predict == 0:
            raise APIError(400, f"'n_predict' must be -1 (to the context's end) or a positive integer, got {n_predict!r}",
                             param="n_predict")
        out["max_tokens"] = 1 << 24 if n_predict == -1 else n_predict  # the engine stops at the context's end
    if out.get("seed") == -1:
        out.pop("seed")
    return out


def native_result(result: dict, model: str) -> dict:
    usage = result["usage"]
    info = result["edgelora"]
    return {"content": result["text"], "stop": True, "model": model,
            "stop_type": "limit" if result["finish_reason"] == "length" else "eos",
            "tokens_predicted": usage["completion_tokens"], "tokens_evaluated": usage["prompt_tokens"],
            "tokens_cached": usage["prompt_tokens_details"]["cached_tokens"],
            "timings": {"predicted_per_second": info["tokens_per_s"], "ttft_ms": round(info["ttft_s"] * 1000, 1)},
            "edgelora": info}


async def native_completion(service, request: Request, body: dict):
    openai_body = openai_body_from_native(body)
    run = service.completion_job(openai_body)
    if not openai_body.get("stream"):
        result = await service.run_job(run, request)
        if result is None:
            return Response(status_code=499)
        log_answer(service, request, result)
        return JSONResponse(native_result(result, response_model(run, openai_body.get("model"), service.model_id)))

    def finish(result):  # the text came in the pieces: the last event carries only the totals
        log_answer(service, request, result)
        return {**native_result(result, response_model(run, openai_body.get("model"), service.model_id)), "content": ""}

    events = await service.stream_job(run, request, lambda text: {"content": text, "stop": False}, finish,
                                      lambda result: None, False)
    if events is None:
        return Response(status_code=499)

    async def without_done():  # llama-server's /completion stream has no [DONE] line: clients parse every line
        async for data in events:
            if data != "[DONE]":
                yield data

    return EventSourceResponse(without_done(), ping=15)


# ---------------------------------------------------------------------------- the web page


def web_routes() -> list[Route]:
    async def index(request: Request):
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers=PAGE_HEADERS)

    async def asset(request: Request):
        name = request.path_params["name"]
        if name not in WEB_FILES:  # a fixed list: no path from the URL ever reaches the file system
            raise APIError(404, f"no such file '/web/{name}'")
        return FileResponse(WEB_DIR / name, media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})

    return [Route("/", index, methods=["GET"]), Route("/web/{name}", asset, methods=["GET"])]

