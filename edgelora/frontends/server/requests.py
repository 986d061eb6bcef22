"""What every route of `edgelora serve` shares: the OpenAI-style error and the request body read as
bounded, checked JSON. server.py and server_extras.py both import it (and it imports neither)."""

from __future__ import annotations

import json

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 64  # OpenAI request bodies nest a few levels; deeper is an attack on the parser


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
