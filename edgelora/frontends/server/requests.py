"""What every route of `edgelora serve` shares: the OpenAI-style error and the request body read as
bounded, checked JSON. server.py and server_extras.py both import it (and it imports neither)."""

from __future__ import annotations

import json
import math

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from edgelora.errors import ContextLengthError, RoleError, SamplingError, UnknownRoleError
from edgelora.runtime.sampling import check_value

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 64  # OpenAI request bodies nest a few levels; deeper is an attack on the parser
MAX_STOP = 4


class APIError(Exception):
    """An OpenAI-style error: status, message, type, param, code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


async def read_json(request: Request) -> dict:
    """The request body as a JSON object, read with a size bound."""
    body = _parse_json(await _read_body(request) or b"null")
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


async def _read_body(request: Request) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # gone, or cut off by the connection's body deadline: nobody reads this
        raise APIError(400, "the client went away before the end of its request body") from None
    return b"".join(chunks)


def _parse_json(raw: bytes):
    """JSON that the rest of the server can handle: bounded nesting, text that encodes as UTF-8."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON ({exc})") from None
    _check_json_tree(body)
    return body


def _check_json_tree(body) -> None:
    """Refuse nesting over MAX_JSON_DEPTH and lone UTF-16 surrogates ("\\udcff" is valid JSON but
    no UTF-8 text: the tokenizer and the error bodies would fail on it). Iterative: no recursion."""
    stack = [(body, "body", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where)
                stack.append((item, key if where == "body" else f"{where}.{key}", depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where)


def _check_text(text: str, where: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"'{where}' holds a lone UTF-16 surrogate (not valid Unicode text)",
                           param=where) from None


def api_error(exc: Exception) -> APIError:
    """Our typed errors (edgelora/errors.py) as OpenAI-style 4xx errors, by their type."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownRoleError):
        return APIError(404, str(exc), code="model_not_found", param="model")
    if isinstance(exc, RoleError):  # a bad selection, a manifest that fails its checks
        return APIError(400, str(exc), param="model")
    if isinstance(exc, SamplingError):
        return APIError(400, str(exc), param=exc.key)
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded")
    return APIError(400, str(exc))


# ---------------------------------------------------------------------------- request fields


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


def _sampling_field(body: dict, key: str):
    """A sampling field, bounded by the one sampling table (runtime/sampling.py) as the CLI and manifests are."""
    value = body.get(key)
    if value is None:  # null, like absent, means the default everywhere (as OpenAI's API)
        return None
    try:
        return check_value(key, value, f"'{key}'")
    except SamplingError as exc:
        raise APIError(400, str(exc), param=key) from None


def sampling_from(body: dict, n_ctx: int) -> dict:
    """The OpenAI sampling fields (and llama.cpp's extras) mapped onto the engine's, bounded."""
    n = body.get("n")
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
    # above the room left in the context: the engine stops there, finish_reason "length"
    sampling = {key: _sampling_field(body, key) for key in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")}
    sampling["max_tokens"] = _sampling_field({"max_tokens": max_tokens}, "max_tokens")
    sampling["stop"] = stop
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
