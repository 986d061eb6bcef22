"""The server's request layer against hostile and sloppy clients: the exact requests a web page can
send, slow and malformed HTTP, JSON nested too deep, lone surrogates, nulls. The app runs in this
process on the shared real engine (starlette's TestClient), or under real uvicorn on a loopback
port with the connection settings `edgelora serve` uses (timeouts shortened to keep tests fast)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from starlette.testclient import TestClient

from edgelora.frontends.server import extras
from edgelora.frontends.server.app import Service, build_app, loopback_hosts
from edgelora.frontends.server.http import uvicorn_settings
from edgelora.roles.session import Roles

ORIGIN = "http://127.0.0.1:8080"  # the server's own origin in the TestClient tests
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def service(clean_engine):
    return Service(clean_engine, Roles(clean_engine))


def client_for(service, **kw) -> TestClient:
    app = build_app(service, allowed_hosts=loopback_hosts("127.0.0.1"), **kw)
    return TestClient(app, base_url=ORIGIN, raise_server_exceptions=False)


@pytest.fixture
def client(service):
    with client_for(service) as c:
        yield c


def is_openai_error(r, status: int, *words: str) -> bool:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message
    return True


def answers(client) -> bool:
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    return bool(r.json()["choices"][0]["message"]["content"])


# ---------------------------------------------------------------------------- cross-site requests

# What `fetch(url, {method: "POST", mode: "no-cors", body: "..."})` on http://evil.example sends: a
# "simple" request, so no preflight, and the Host header names the server.
BROWSER = {"Origin": "http://evil.example", "Content-Type": "text/plain;charset=UTF-8", "Sec-Fetch-Site": "cross-site",
           "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "empty", "Accept": "*/*"}


def test_a_cross_site_page_cannot_change_the_default_scales(client):
    r = client.post("/lora-adapters", content=b'[{"id": 0, "scale": 1.0}]', headers=BROWSER)
    assert is_openai_error(r, 403, "http://evil.example", "--cors-origin")
    assert all(row["scale"] == 0.0 for row in client.get("/lora-adapters").json())


def test_a_cross_site_page_cannot_preload_reload_or_generate(client, service):
    no_body = {k: v for k, v in BROWSER.items() if k != "Content-Type"}  # fetch with no body sends none
    assert client.post("/v1/roles/pirate/preload", headers=no_body).status_code == 403
    assert client.post("/v1/roles/reload", headers=no_body).status_code == 403
    r = client.post("/v1/chat/completions", content=json.dumps(CHAT).encode(), headers=BROWSER)
    assert is_openai_error(r, 403, "Origin")
    assert service.worker.served == 0 and not service.engine.resident  # nothing ran, nothing loaded


def test_a_body_that_is_not_declared_json_is_refused_even_without_origin(client, service):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = client.post("/lora-adapters", content=b'[{"id": 0, "scale": 1.0}]', headers=headers)
        assert is_openai_error(r, 415, "application/json")
    assert all(row["scale"] == 0.0 for row in client.get("/lora-adapters").json())
    r = client.post("/v1/chat/completions", content=json.dumps(CHAT).encode(),
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200


def test_the_servers_own_page_and_listed_origins_may_post(service):
    with client_for(service) as c:
        assert c.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN}).status_code == 200
    with client_for(service, cors_origins=["http://localhost:3000"]) as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://localhost:3000"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert c.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://evil.example"}).status_code == 403


# ---------------------------------------------------------------------------- the JSON body


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/lora-adapters"])
def test_json_nested_a_thousand_deep_is_an_openai_style_400(client, path):
    for raw in ("[" * 1000 + "]" * 1000, '{"messages": ' + '{"a": ' * 1000 + "1" + "}" * 1001):
        r = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
        assert is_openai_error(r, 400, "nest")
    assert answers(client)


@pytest.mark.parametrize("path, raw, field", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\udcffb"}], "max_tokens": 2}',
     "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "system", "content": "\\ud800"}, {"role": "user", "content": "hi"}]}',
     "messages[0].content"),
    ("/v1/completions", '{"prompt": "x\\udcff", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"model": "\\udcff", "messages": [{"role": "user", "content": "hi"}]}', "model"),
])
def test_a_lone_surrogate_is_a_400_naming_its_field(client, path, raw, field):
    r = client.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})
    assert is_openai_error(r, 400, "surrogate", field)
    assert answers(client)


def test_null_means_the_default_for_every_optional_field(client):
    nulls = {k: None for k in ("n", "stream", "stream_options", "max_completion_tokens", "temperature", "top_p",
                               "top_k", "min_p", "repeat_penalty", "seed", "stop", "lora", "model")}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                {"role": "user", "content": "Count to twenty."}]
    r = client.post("/v1/chat/completions", json={**nulls, "messages": messages, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3  # max_tokens counts when max_completion_tokens is null
    r = client.post("/v1/completions", json={**nulls, "prompt": "Once", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert client.post("/lora-adapters", json=[{"id": 0, "scale": None}]).json()[0]["scale"] == 1.0


@pytest.mark.parametrize("key", ["temperature", "max_tokens", "seed"])
def test_an_integer_too_large_for_a_float_is_a_400(client, key):
    r = client.post("/v1/chat/completions", json={**CHAT, key: 10**400})
    assert is_openai_error(r, 400, f"'{key}'")


# ---------------------------------------------------------------------------- HTTP under uvicorn

SHORT = dict(header_timeout_s=1.0, body_timeout_s=1.5, max_connections=8)


@contextmanager
def live(service, **settings):
    """Real uvicorn on a free loopback port, with serve's connection settings."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(service, allowed_hosts=loopback_hosts("127.0.0.1"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           **uvicorn_settings(**{**SHORT, **settings})))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def read_response(sock: socket.socket, limit_s: float = 10) -> tuple[int, dict, bytes]:
    """Everything the server sends until it closes: status, headers, body. A reset is a failure."""
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def request_bytes(port: int, body: bytes = b"", **headers: str) -> bytes:
    fields = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", **headers}
    head = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in fields.items())
    return f"POST /v1/chat/completions HTTP/1.1\r\n{head}\r\n".encode() + body


def test_slow_clients_get_a_408_and_the_server_keeps_serving(service):
    with live(service) as port:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
        started = time.monotonic()
        whole = request_bytes(port)
        for s in socks[:3]:  # a header a byte at a time
            s.sendall(whole[:20])
        body = json.dumps(CHAT).encode()
        for s in socks[3:]:  # the head, then a body that never ends
            s.sendall(request_bytes(port, body[:10], Content_Length=str(len(body))))

        def drip():
            for _ in range(8):
                time.sleep(0.25)
                for s in socks:
                    try:
                        s.send(b"x")
                    except OSError:
                        pass

        dripper = threading.Thread(target=drip)
        dripper.start()
        for s in socks:
            status, headers, reply = read_response(s)
            assert status == 408 and headers["content-type"] == "application/json"
            assert "within" in json.loads(reply)["error"]["message"]
        assert time.monotonic() - started < 4  # not held until the client gives up
        dripper.join()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(request_bytes(port, body, Content_Length=str(len(body)), Connection="close"))
            assert read_response(s, 60)[0] == 200


def test_connections_over_the_cap_get_a_503(service):
    with live(service, max_connections=3) as port:
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as s:
            status, headers, reply = read_response(s)
        assert status == 503 and headers["retry-after"] == "1"
        assert "connections" in json.loads(reply)["error"]["message"]
        for s in held:
            s.close()


@pytest.mark.parametrize("raw, status, words", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n", 400, "Content-Length"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello", 400, "Content-Length"),
    (bytes.fromhex("16030100f4010000f00303") + bytes(range(256)) * 2, 400, "invalid HTTP request"),  # a TLS hello
    (b"GET /health HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n", 431, "request head over"),
], ids=["length-negative", "length-letters", "length-plus", "tls-hello", "header-200k"])
def test_malformed_http_gets_a_json_error_not_a_reset(service, raw, status, words):
    with live(service) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(raw)
            got, headers, reply = read_response(s)
        assert got == status and headers["content-type"] == "application/json"
        assert words in json.loads(reply)["error"]["message"]


# ---------------------------------------------------------------------------- the log, the page, the response's model


def test_a_path_with_terminal_escapes_is_logged_quoted_never_raw(service, capsys):
    # what <img src="http://127.0.0.1:8080/%1b]0;x%07%1b[2J"> on any web site makes a browser send
    with client_for(service, request_log=True) as client:
        assert client.get("/%1b]0;x%07%1b[2J").status_code == 404
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert "GET /%1B%5D0;x%07%1B%5B2J 404" in err, err


def test_no_logged_field_writes_control_characters():
    log = extras.RequestLog(None, stream=io.StringIO())
    scope = {"method": "POST", "path": "/v1/chat/completions"}
    log._write(scope, 200, {"edgelora_log": "role=\x1b]0;x\x07pirate\nfake line tokens=1+1"}, 0.0)
    line = log.stream.getvalue()
    assert line.count("\n") == 1 and "\x1b" not in line and "\x07" not in line
    assert "role=\\x1b]0;x\\x07pirate\\nfake line" in line


def test_no_other_site_can_frame_the_page(client):
    r = client.get("/")
    assert r.status_code == 200
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"


def test_cors_origin_star_without_an_api_key_is_refused_at_start(tmp_path):
    env = {**os.environ, "EDGELORA_HOME": str(tmp_path), "EDGELORA_CONFIG": str(tmp_path / "none.toml")}
    p = subprocess.run([sys.executable, "-m", "edgelora", "serve", "--cors-origin", "*"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "--cors-origin" in p.stderr and "--api-key" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 2}),
    ("/completion", {"prompt": "Once upon a time", "n_predict": 2}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_the_response_model_is_never_taken_from_the_request_body(client, path, body, stream):
    for planted in ({"an": "object"}, "gpt-planted"):
        r = client.post(path, json={**body, "model": "pirate", "_edgelora_answered_by": planted, "stream": stream})
        assert r.status_code == 200, r.text
        answers = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")] if stream \
            else [r.json()]
        assert answers and {a["model"] for a in answers if "model" in a} == {"pirate"}, answers  # native pieces: none


# ---------------------------------------------------------------------------- the fallback role


@pytest.fixture
def fallback_client(clean_engine):
    service = Service(clean_engine, Roles(clean_engine), fallback_role="terse")
    with client_for(service) as c:
        yield c


def chat_as(client, model: str):
    return client.post("/v1/chat/completions", json={**CHAT, "model": model})


@pytest.mark.parametrize("model", ["llama3:8b", "qwen2.5:7b", "llama3:70", "gpt-4o-mini"])
def test_ollama_style_names_with_a_colon_are_answered_by_the_fallback_role(fallback_client, model):
    r = chat_as(fallback_client, model)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "terse" and r.json()["edgelora"]["fallback"]["requested"] == model


def test_a_known_role_with_a_weight_is_still_a_weighted_role_not_the_fallback(fallback_client):
    r = chat_as(fallback_client, "pirate:0.5")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "pirate:0.5" and "fallback" not in r.json()["edgelora"]
    assert is_openai_error(chat_as(fallback_client, "pirate:abc"), 400, "weight")
    assert is_openai_error(chat_as(fallback_client, "pirat:0.5+terse"), 404, "unknown role 'pirat'")
