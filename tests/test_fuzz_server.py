"""Seeded, bounded fuzzing of the server's request parser: valid OpenAI requests mutated field by
field (every JSON type, nulls, huge numbers, lone surrogates, nesting thousands deep), then byte by
byte, sent with assorted content types and origins to one in-process app on the real engine. Every
case must be answered with status < 500 and a JSON body (or, for a stream, JSON events), and the
server must still answer a normal request afterwards. Generation is bounded to 2 tokens a case."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from starlette.testclient import TestClient

from edgelora.frontends.server.app import Service, build_app, loopback_hosts
from edgelora.roles.session import Roles

SEED = 20261124
CASES = 300
ORIGIN = "http://127.0.0.1:8080"
DEEP = "\x00deep\x00"  # stands for a nested value written into the JSON text (json.dumps would recurse)

KEYS = ["model", "n_predict", "content", "tokens", "with_pieces", "add_special", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "min_p", "repeat_penalty", "seed", "stop", "stream", "stream_options", "n", "lora", "user", "x"]
MODELS = ["base", "pirate", "terse", "pirate:0.5+terse:0.5", "pirate:abc", "nope", "", "default", "+", "a" * 300]


def scalar(rng: random.Random):
    return rng.choice([None, True, False, 0, 1, -1, 2, 10**9, 10**400, -(10**400), 0.5, -0.0, 1e308, 3.7, "",
                       "2", "true", "null", text(rng), [], {}])


def text(rng: random.Random) -> str:
    alphabet = ["a", "b", " ", "\n", "é", "中", "\U0001f600", "\x00", "\udcff", "\ud800", "\\", '"', "<|im_end|>"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def value(rng: random.Random, depth: int = 0):
    kind = rng.random()
    if kind < 0.6 or depth > 2:
        return scalar(rng)
    if kind < 0.75:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind < 0.9:
        return {rng.choice(KEYS + ["role", "content", "id", "scale", text(rng)]): value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    return DEEP


def template(rng: random.Random, path: str):
    if path == "/lora-adapters":
        return [{"id": rng.randint(0, 5), "scale": rng.choice([0.0, 0.5, 1.0])} for _ in range(rng.randint(0, 2))]
    if path == "/tokenize":
        return {"content": text(rng), "add_special": rng.random() < 0.5, "with_pieces": rng.random() < 0.5}
    if path == "/detokenize":
        return {"tokens": [rng.choice([0, 1, 2, 100, 49151, 49152, -1]) for _ in range(rng.randint(0, 4))]}
    if path == "/completion":  # llama-server's native fields
        return {"prompt": "Once upon a time", "n_predict": rng.choice([1, 2]), "stream": rng.random() < 0.2,
                **({"model": rng.choice(MODELS)} if rng.random() < 0.5 else {})}
    body = {"model": rng.choice(MODELS), "max_tokens": rng.choice([1, 2])}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": rng.choice(["system", "user", "assistant", "developer"]), "content": "hi"}
                            for _ in range(rng.randint(1, 3))] + [{"role": "user", "content": "Say hi."}]
    else:
        body["prompt"] = "Once upon a time"
    if rng.random() < 0.2:
        body["stream"] = True
    return body


def mutate(rng: random.Random, body):
    """One change somewhere in the tree: a value replaced, a key dropped or added, text spoiled."""
    target, key = body, None
    for _ in range(rng.randint(0, 3)):  # walk down a little
        if isinstance(target, dict) and target:
            key = rng.choice(list(target))
        elif isinstance(target, list) and target:
            key = rng.randrange(len(target))
        else:
            break
        if not isinstance(target[key], (dict, list)) or rng.random() < 0.4:
            break
        target = target[key]
    if isinstance(target, dict):
        roll = rng.random()
        if roll < 0.15 and target:
            target.pop(rng.choice(list(target)))
        elif roll < 0.35:
            target[rng.choice(KEYS)] = value(rng)
        else:
            target[key if key in target else rng.choice(KEYS)] = value(rng)
    elif isinstance(target, list):
        if target and rng.random() < 0.7:
            target[rng.randrange(len(target))] = value(rng)
        else:
            target.append(value(rng))
    return body


def bounded(body, path: str):
    """At most 2 tokens of generation a case, whatever the mutations did to max_tokens (n_predict)."""
    if unbounded(body, path):
        body["n_predict" if path == "/completion" else "max_completion_tokens"] = 2
    return body


def unbounded(body, path: str) -> bool:
    """Would this body generate more than a few tokens (the engine's default is 256)?"""
    if not isinstance(body, dict):
        return False
    if path == "/completion":  # only n_predict counts there; -1 runs to the context's end
        limit = body.get("n_predict")
        return limit is None or limit == -1 or (type(limit) is int and limit > 8)
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit
    return limit is None or (type(limit) is int and 8 < limit <= 1 << 20)


def parses_bounded(raw: bytes, path: str) -> bool:
    try:
        return not unbounded(json.loads(raw), path)
    except (ValueError, RecursionError):
        return True  # refused before any generation


def encode(rng: random.Random, body, path: str) -> bytes:
    raw = json.dumps(body).encode()  # ensure_ascii: lone surrogates become "\udcff" escapes, as a client sends
    depth = rng.choice([10, 63, 64, 65, 500, 999, 1000, 5000, 50_000])
    opener = rng.choice(["[", '{"a": '])
    closer = "]" if opener == "[" else "}"
    raw = raw.replace(json.dumps(DEEP).encode(), (opener * depth + "1" + closer * depth).encode())
    if rng.random() < 0.2:  # bytes: flipped, cut, invalid UTF-8, NaN literals
        data = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            roll, at = rng.random(), rng.randrange(len(data) + 1)
            if roll < 0.3 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif roll < 0.5:
                del data[at:]
            elif roll < 0.7:
                data[at:at] = rng.choice([b"\xff", b"\xc3", b"\xed\xb3\xbf", b"NaN", b"-Infinity", b"\\ud800", b"{"])
            else:
                data[at:at] = rng.choice([b",", b"]", b"}", b'"', b"\\", b"1e999", b"9" * 5000])
        if parses_bounded(bytes(data), path):  # a spoiled max_tokens key must not cost a 256-token answer
            raw = bytes(data)
    return raw


def case(rng: random.Random) -> tuple[str, bytes, dict]:
    path = rng.choices(["/v1/chat/completions", "/v1/completions", "/lora-adapters", "role", "/v1/roles/reload",
                        "/completion", "/tokenize", "/detokenize"], weights=[35, 18, 12, 10, 3, 10, 6, 6])[0]
    if path == "role":
        name = rng.choice(["pirate", "terse", "nope", "a%20b", "é", "..", "base"])
        path = f"/v1/roles/{name}/{rng.choice(['preload', 'evict', 'explode'])}"
    body = template(rng, path)
    for _ in range(rng.randint(1, 3)):
        body = mutate(rng, body)
    raw = encode(rng, bounded(body, path), path) if not path.startswith("/v1/roles/") or rng.random() < 0.3 else b""
    headers = {"Content-Type": rng.choices(["application/json", "application/json; charset=utf-8", "text/plain",
                                            "application/x-www-form-urlencoded", ""], weights=[80, 8, 4, 4, 4])[0]}
    if rng.random() < 0.1:
        headers["Origin"] = rng.choice([ORIGIN, "http://evil.example", "null"])
    return path, raw, headers


def problem(r, path: str) -> str | None:
    """Why this answer is not acceptable, or None."""
    if r.status_code >= 500:
        return f"{r.status_code}: {r.text[:200]}"
    kind = r.headers.get("content-type", "")
    if r.status_code == 200 and kind.startswith("text/event-stream"):
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        if path == "/completion":  # llama-server's native stream: no [DONE], the last event says "stop": true
            if not events or not json.loads(events[-1]).get("stop"):
                return f"stream without its last event: {r.text[-200:]}"
            events.append("[DONE]")
        if not events or events[-1] != "[DONE]":
            return f"stream without [DONE]: {r.text[-200:]}"
        bad = [e for e in events[:-1] if not isinstance(json.loads(e), dict)]
        return f"non-JSON events {bad[:2]}" if bad else None
    if kind != "application/json":
        return f"{r.status_code} with Content-Type {kind!r}: {r.text[:200]}"
    json.loads(r.text)
    return None


@pytest.fixture
def client(clean_engine):
    service = Service(clean_engine, Roles(clean_engine))
    app = build_app(service, allowed_hosts=loopback_hosts("127.0.0.1"))
    with TestClient(app, base_url=ORIGIN, raise_server_exceptions=False) as c:
        yield c


def test_fuzzed_request_bodies_get_json_answers_under_500_and_the_server_keeps_serving(client):
    rng = random.Random(SEED)
    statuses, failures = Counter(), []
    normal = {"model": "base", "messages": [{"role": "user", "content": "What is the moon?"}], "max_tokens": 2}
    for i in range(CASES):
        path, raw, headers = case(rng)
        r = client.post(path, content=raw, headers={k: v for k, v in headers.items() if v})
        statuses[r.status_code] += 1
        if (why := problem(r, path)) is not None:
            failures.append(f"case {i} {path} {raw[:120]!r}: {why}")
        if i % 100 == 99:
            assert client.post("/v1/chat/completions", json=normal).status_code == 200, f"after case {i}"
    print(f"\n[fuzz-server] {CASES} cases, statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:20])
    r = client.post("/v1/chat/completions", json=normal)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert statuses[200] > CASES // 20 and sum(n for s, n in statuses.items() if 400 <= s < 500) > CASES // 3
