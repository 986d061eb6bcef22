"""The HTTP connection layer under `edgelora serve`: uvicorn's h11 protocol with the limits it lacks.

uvicorn closes an idle keep-alive connection, but a client that sends its request a byte at a time
holds its connection forever, it has no cap on open connections (``limit_concurrency`` answers
plain-text 503s per request), and it answers a malformed request (a bad Content-Length, a TLS
handshake on the HTTP port, headers over 16 KiB) in plain text, then closes while the client is
still sending, which the client often sees as a reset and no answer at all. This protocol adds a
deadline for the request head and one for the body, a cap on open connections, and answers those
errors with the OpenAI-style JSON error body the rest of the server uses, read to the end first.
"""

from __future__ import annotations

import http
import json
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0  # from the connection (or the previous answer) to the end of the request head
BODY_TIMEOUT_S = 30.0  # from the end of the head to the end of the body (1 MiB at most: >= 35 KB/s)
LINGER_S = 2.0  # after an error answer, what the client still sends is read and dropped, so it sees the answer
MAX_HEADER_BYTES = 16 * 1024  # h11's default; over it: 431


def max_connections_for(max_queue: int) -> int:
    """Every queued request holds a connection; leave room for streams, polls and idle keep-alives."""
    return 2 * max_queue + 32


def error_response(status: int, message: str, code: str, type: str = "invalid_request_error") -> bytes:
    """A whole HTTP/1.1 response with an OpenAI-style error body, for when no request cycle can answer."""
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    retry = "retry-after: 1\r\n" if status == 503 else ""  # like a full queue's 503
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """One connection. At most one deadline runs at a time: for the request head while none has
    come, for the body while it comes in; none while the app works on a whole request."""

    header_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    max_connections = max_connections_for(16)

    def connection_made(self, transport) -> None:
        self._deadline = None
        self._phase: str | None = None
        self._refused = False
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(503, f"too many open connections (the limit is {self.max_connections}); retry shortly",
                         "too_many_connections", type="server_busy")
            return
        self._follow()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered already: drop what the client still sends
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc) -> None:
        self._cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this inside its `except h11.RemoteProtocolError`, so the error is at hand:
        # it says what was wrong (h11 also hints 431 for oversize headers)
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400)
        reason = str(exc) if exc is not None and str(exc) else "malformed request"
        if status == 431:
            reason = f"request head over {MAX_HEADER_BYTES} bytes"
        self._refuse(status, f"invalid HTTP request: {reason}", "bad_http_request")

    # ------------------------------------------------------------------------------------------

    def _follow(self) -> None:
        """Arm the deadline that fits where the client is in its request."""
        if self._refused or self.transport.is_closing():
            return self._cancel()
        state = self.conn.their_state
        phase = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if phase != self._phase:
            self._cancel()
            self._phase = phase
            if phase is not None:
                seconds = self.header_timeout_s if phase == "head" else self.body_timeout_s
                self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self, phase: str) -> None:
        self._deadline, self._phase = None, None
        if self.transport.is_closing():
            return
        if phase == "head" and not self.conn.trailing_data[0]:
            self.transport.close()  # an idle connection, nothing asked: close it quietly
        elif phase == "head":
            self._refuse(408, f"request head not received within {self.header_timeout_s:g} s", "request_timeout")
        elif self.cycle.response_started:
            self.transport.close()  # answered (or answering) already; the rest of the body is not waited for
        else:
            self._refuse(408, f"request body not received within {self.body_timeout_s:g} s", "request_timeout")

    def _refuse(self, status: int, message: str, code: str, type: str = "invalid_request_error") -> None:
        """Answer and close: the app never sees this request (a cycle waiting for its body is told
        the client went away). Reading goes on a little, so the close does not reset the answer away."""
        self._cancel()
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.write(error_response(status, message, code, type))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol(*, header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S,
             max_connections: int = max_connections_for(16)) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s, "max_connections": max_connections})


def uvicorn_settings(**limits) -> dict:
    """What `edgelora serve` passes to uvicorn besides the app, host and port."""
    return {"http": protocol(**limits), "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "timeout_keep_alive": 5}
