"""`edgelora serve`: real server processes on 127.0.0.1 (random free ports), the real model, and the
official `openai` client. Greedy comparisons run against a server started with --no-prefix-reuse,
so both sides evaluate prompts the same way (README "Reproducibility")."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from edgelora.files import sha256_file

from . import gguf_factory as gf
from .conftest import write_role
from .serving import Server

BUNDLED = ["pirate", "json", "terse", "signoff"]
Q = "What is the moon?"


@pytest.fixture(scope="module")
def roles_dir(tmp_path_factory, smol_adapters):
    d = tmp_path_factory.mktemp("served-roles")
    shutil.copy(smol_adapters["a"], d / "hot-v1.gguf")
    write_role(d, "hot", d / "hot-v1.gguf")
    write_role(d, "ref-c", smol_adapters["c"])  # what adapter c answers, to check a version rewritten in place
    return d


@pytest.fixture(scope="module")
def server(tmp_path_factory, roles_dir):
    s = Server(tmp_path_factory.mktemp("server-home"), "--role-dir", str(roles_dir), "--ctx", "1024")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("exact-home"), "--no-prefix-reuse", "--max-queue", "128", "--ctx", "1024")
    yield s
    s.stop()


def chat(srv: Server, model: str, content: str = Q, stream: bool = False, max_tokens: int = 12) -> tuple[str, dict]:
    msgs = [{"role": "user", "content": content}]
    if not stream:
        r = srv.client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.model_extra["edgelora"]
    text, info = "", None
    for chunk in srv.client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens, temperature=0,
                                                    stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.model_extra.get("edgelora"):
            info = chunk.model_extra["edgelora"]
    return text, info


def test_openai_client_models_chat_stream_completions(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids[:2] == ["base", "auto"] and {"pirate", "terse", "hot"} <= set(ids)

    r = server.client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": Q}],
                                              max_tokens=16, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 16
    assert [a["name"] for a in r.model_extra["edgelora"]["adapters"]] == ["pirate"]

    chunks = list(server.client.chat.completions.create(
        model="terse", messages=[{"role": "user", "content": Q}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens <= 8 and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")

    c = server.client.completions.create(model="base", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens <= 8

    routed = server.client.chat.completions.create(model="auto", max_tokens=4, temperature=0,
                                                   messages=[{"role": "user", "content": "Answer as a pirate: hi"}])
    assert routed.model_extra["edgelora"]["route"]["role"] == "pirate" and routed.model_extra["edgelora"]["route"]["reason"]

    stacked = server.client.chat.completions.create(model="pirate:0.7+terse:0.3", max_tokens=4, temperature=0,
                                                    messages=[{"role": "user", "content": Q}])
    assert {a["name"]: a["scale"] for a in stacked.model_extra["edgelora"]["adapters"]} == {"pirate": 0.7, "terse": 0.3}


def test_each_bundled_role_through_the_server_equals_ask(exact):
    for role in ["base", *BUNDLED]:
        served, info = chat(exact, role, max_tokens=16)
        asked = subprocess.run([sys.executable, "-m", "edgelora", "ask", "--role", role, Q, "--temperature", "0",
                                "--max-tokens", "16", "--no-log", "--json"], capture_output=True, text=True, timeout=120)
        assert asked.returncode == 0, asked.stderr
        out = json.loads(asked.stdout)
        assert served == out["text"], role
        assert info["adapters"] == out["adapters"]


def test_concurrent_clients_with_mixed_roles_never_cross_talk(exact):
    """8 clients x 10 requests, mixed roles and stacks, streaming and not: every reply is that
    role's single-client greedy reply, no 5xx, nothing left in the queue."""
    models = ["pirate", "terse", "base", "json", "pirate:0.7+terse:0.3", "signoff"]
    prompts = ["What is the moon?", "Name a fruit."]
    expected = {(m, p): chat(exact, m, p, max_tokens=8)[0] for m in models for p in prompts}
    assert len(set(expected.values())) >= len(models)  # the roles really answer differently
    served_before = exact.health()["served"]

    def client(i: int) -> list[tuple]:
        got = []
        for j in range(10):
            m, p = models[(i + j) % len(models)], prompts[(i * 3 + j) % len(prompts)]
            text, info = chat(exact, m, p, stream=(i + j) % 2 == 0, max_tokens=8)
            got.append((m, p, text, info))
        return got

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(client, range(8)) for r in rs]
    assert len(results) == 80
    wrong = [(m, p, t) for m, p, t, _ in results if t != expected[(m, p)]]
    assert not wrong
    health = exact.health()
    assert health["queue"] == 0 and health["served"] - served_before == 80


def test_returning_multi_turn_client_reuses_its_kv_state(server):
    history = [{"role": "user", "content": "Tell me about ships and the sea in three sentences."}]
    first = server.client.chat.completions.create(model="pirate", messages=history, max_tokens=24, temperature=0)
    history.append({"role": "assistant", "content": first.choices[0].message.content})
    chat(server, "terse", "Unrelated: name a colour.", max_tokens=4)  # another client, another role
    history.append({"role": "user", "content": "And about rivers?"})
    again = server.client.chat.completions.create(model="pirate", messages=history, max_tokens=8, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert [a["name"] for a in again.model_extra["edgelora"]["adapters"]] == ["pirate"]


def _stopped_after_hangup(server: Server, before: dict) -> float:
    """Seconds from now until the server has counted one more cancelled job and nothing runs."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        now = server.health()
        if now["cancelled"] > before["cancelled"] and now["queue"] == 0:
            break
        time.sleep(0.05)
    assert server.health()["cancelled"] == before["cancelled"] + 1  # it was still generating when we left
    return time.monotonic() - t0


def test_client_disconnect_stops_generation(server):
    """Uncancelled, this prompt runs to its 600 tokens (several seconds); a client that hangs up,
    streaming or not, stops it within a token (plus the server's 0.25 s watch while waiting)."""
    body = {"model": "base", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 600, "temperature": 0}  # counts on
    before = server.health()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # first token arrived: hang up
    assert _stopped_after_hangup(server, before) < 2.0

    before = server.health()
    with pytest.raises(httpx.ReadTimeout):  # not streaming: the client gives up waiting
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    assert _stopped_after_hangup(server, before) < 2.0
    assert chat(server, "base", max_tokens=2)[0]


def test_hot_reload_while_streaming_and_a_tampered_version_is_refused(server, roles_dir, smol_adapters):
    v1 = str(roles_dir / "hot-v1.gguf")
    assert chat(server, "hot")[1]["adapters"][0]["path"] == v1

    results = {}

    def long_stream():
        results["stream"] = chat(server, "hot", "Write a long story about a dragon.", stream=True, max_tokens=48)

    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(0.3)
    shutil.copy(smol_adapters["b"], roles_dir / "hot-v2.gguf")  # a new version: new file + manifest with its sha256
    write_role(roles_dir, "hot", roles_dir / "hot-v2.gguf")
    reload = server.post("/v1/roles/reload").json()
    t.join(60)
    assert results["stream"][1]["adapters"][0]["path"] == v1  # in flight: finished on the version it started with
    assert "hot" in reload["reloaded"] and not reload["refused"]
    v2 = str(roles_dir / "hot-v2.gguf")
    assert chat(server, "hot")[1]["adapters"][0]["path"] == v2

    tampered = roles_dir / "hot-v3.gguf"
    tampered.write_bytes((roles_dir / "hot-v2.gguf").read_bytes()[:-16] + b"\0" * 16)
    write_role(roles_dir, "hot", tampered, sha=sha256_file(smol_adapters["c"]))  # pin does not match the file
    refused = server.post("/v1/roles/reload").json()
    assert "hot" in refused["refused"] and "sha256" in refused["refused"]["hot"]
    assert chat(server, "hot")[1]["adapters"][0]["path"] == v2  # the old version keeps serving
    write_role(roles_dir, "hot", roles_dir / "hot-v2.gguf")


def test_reload_keeps_the_old_role_when_the_new_one_is_broken(server, roles_dir):
    def answer(model: str) -> tuple[str, list]:
        text, info = chat(server, model)
        return text, info["adapters"]

    v2 = answer("hot")
    manifest = roles_dir / "hot.toml"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])  # a manifest half written (or broken): the old role stays
    refused = server.post("/v1/roles/reload").json()
    assert "hot" in refused["refused"] and "hot" in refused["roles"]
    assert answer("hot") == v2

    bad = roles_dir / "hot-bad.gguf"  # pinned correctly, but its shapes fit no SmolLM2 tensor
    rng = __import__("numpy").random.default_rng(0)
    gf.write_lora(bad, {"blk.0.attn_q.weight": (rng.standard_normal((4, 100)), rng.standard_normal((100, 4)))},
                  alpha=4.0)
    write_role(roles_dir, "hot", bad)
    refused = server.post("/v1/roles/reload").json()
    assert "blk.0.attn_q" in refused["refused"]["hot"]
    assert answer("hot") == v2
    write_role(roles_dir, "hot", roles_dir / "hot-v2.gguf")


def test_reload_of_a_file_rewritten_in_place_serves_the_new_weights(server, roles_dir, smol_adapters, smol_info):
    """Same path, new content and pin, while the old version is still resident (and active)."""
    path = roles_dir / "inplace.gguf"
    layers = [f"blk.{i}.ffn_gate.weight" for i in range(0, 30, 3)]
    gf.write_lora(path, gf.random_lora(smol_info.tensors, layers, rank=4, seed=44, std=0.12), alpha=8.0)
    write_role(roles_dir, "inplace", path)
    assert "inplace" in server.post("/v1/roles/reload").json()["reloaded"]
    old = chat(server, "inplace")[0]
    path.write_bytes(smol_adapters["c"].read_bytes())
    write_role(roles_dir, "inplace", path)
    reload = server.post("/v1/roles/reload").json()
    assert reload["reloaded"] == ["inplace"] and not reload["refused"]
    text, info = chat(server, "inplace")
    assert text != old, "the resident old version answered"
    assert text == chat(server, "ref-c")[0]  # (asked after: adapters with equal sha256 share residency)
    assert info["adapters"][0]["path"] == str(path)


def test_llama_server_lora_adapters(server):
    table = httpx.get(server.url + "/lora-adapters").json()
    pirate = next(row["id"] for row in table if row["role"] == "pirate")
    assert all(row["scale"] == 0.0 for row in table)
    assert server.post("/lora-adapters", json=[{"id": pirate, "scale": 0.5}]).status_code == 200
    plain = server.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert plain.json()["edgelora"]["adapters"] == [{"name": "pirate", "path": table[pirate]["path"], "scale": 0.5}]
    per_request = server.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "lora": [{"id": pirate, "scale": 0.25}]})
    assert per_request.json()["edgelora"]["adapters"][0]["scale"] == 0.25
    server.post("/lora-adapters", json=[])


def test_roles_over_http_preload_and_evict(server):
    assert server.post("/v1/roles/signoff/evict").status_code == 200
    report = {r["name"]: r for r in httpx.get(server.url + "/v1/roles").json()["roles"]}
    assert report["signoff"]["resident"] is False
    report = {r["name"]: r for r in server.post("/v1/roles/signoff/preload").json()["roles"]}
    assert report["signoff"]["resident"] is True and report["signoff"]["active"] is False


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "unknown role 'nope'"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}], "stream": True}, 404, "unknown role"),
    ("/v1/chat/completions", {"model": 7, "messages": [{"role": "user", "content": "x"}]}, 400, "'model'"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "'stream'"),
    ("/v1/chat/completions", {"model": "base", "messages": []}, 400, "'messages'"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400, "'role'"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "'temperature'"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "'max_tokens'"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "'n'"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "x"}], "lora": [{"id": 999}]}, 400, "lora"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "word " * 1500}]}, 400, "context"),
    ("/v1/completions", {"model": "base", "prompt": "word " * 1500, "stream": True}, 400, "context"),  # found by the worker
    ("/v1/completions", {"model": "base", "prompt": 42}, 400, "'prompt'"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/chat/completions", b"x" * (2 << 20), 413, "body"),
])
def test_bad_requests_get_openai_style_4xx_and_the_server_keeps_serving(server, path, body, status, words):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = server.post(path, **kw)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    assert chat(server, "base", max_tokens=2)[0]


def test_host_header_must_name_the_server(server):
    r = httpx.get(server.url + "/v1/models", headers={"Host": "attacker.example"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host"
    assert httpx.get(server.url.replace("127.0.0.1", "localhost") + "/health").status_code == 200
    assert "access-control-allow-origin" not in httpx.get(server.url + "/v1/models", headers={"Origin": "http://x"}).headers


def test_api_key_and_queue_limit(tmp_path):
    srv = Server(tmp_path, "--api-key", "sekret", "--max-queue", "1", "--ctx", "512")
    try:
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        # the web page's own files need no key (a browser cannot send one); the page asks for it
        assert httpx.get(srv.url + "/").status_code == 200
        assert httpx.post(srv.url + "/", json={}).status_code in (401, 405)
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        body = {"model": "base", "messages": [{"role": "user", "content": "Count to 200."}], "max_tokens": 200}
        headers = {"Authorization": "Bearer sekret"}
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda _: httpx.post(srv.url + "/v1/chat/completions", json=body, headers=headers,
                                                       timeout=120), range(4)))
        busy = [r for r in codes if r.status_code == 503]
        assert busy and all(r.headers["Retry-After"] == "1" for r in busy)
        assert all(r.status_code in (200, 503) for r in codes)
    finally:
        srv.stop()


def test_binding_beyond_loopback_needs_an_api_key():
    r = subprocess.run([sys.executable, "-m", "edgelora", "serve", "--host", "0.0.0.0"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr and r.stderr.count("\n") == 1
