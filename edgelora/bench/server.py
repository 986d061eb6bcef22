"""`edgelora bench --only server`: the HTTP server under load, measured against itself in one run.

- throughput and latency: the same number of requests from concurrent clients, all on one role vs
  mixed roles (every request switches adapters);
- a returning multi-turn client: time to first token of its next turn after other clients with other
  roles came in between, with the engine's per-adapter-set KV states vs without (kv_cache_bytes = 0).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable
from urllib import request as urlreq

ROLES = ["pirate", "terse", "json", "signoff"]
CLIENTS = 4
PER_CLIENT = 6
MAX_TOKENS = 16


class _Server:
    def __init__(self, model: Path, kv_cache_bytes: int | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.tmp = tempfile.TemporaryDirectory()
        env = dict(os.environ)
        if kv_cache_bytes is not None:
            cfg = Path(self.tmp.name) / "config.toml"
            cfg.write_text(f"kv_cache_bytes = {kv_cache_bytes}\n")
            env["EDGELORA_CONFIG"] = str(cfg)
        self.proc = subprocess.Popen([sys.executable, "-m", "edgelora", "serve", "-m", str(model), "--port", str(self.port),
                                      "--ctx", "2048", "--max-queue", "64"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urlreq.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError("the server did not start")

    def chat(self, model: str, messages: list[dict], max_tokens: int = MAX_TOKENS, stream: bool = False):
        body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                           "stream": stream}).encode()
        req = urlreq.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urlreq.urlopen(req, timeout=300) as resp:
            if not stream:
                return json.loads(resp.read()), time.perf_counter() - t0
            first = None
            text = ""
            for line in resp:
                line = line.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if delta and first is None:
                    first = time.perf_counter() - t0
                text += delta or ""
            return text, first

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.tmp.cleanup()


def _load(srv: _Server, pick: Callable[[int, int], str]) -> dict:
    prompts = ["What is the moon?", "Name three fruits.", "Why is the sea salty?"]

    def client(i: int) -> list[tuple[float, int]]:
        out = []
        for j in range(PER_CLIENT):
            body, seconds = srv.chat(pick(i, j), [{"role": "user", "content": prompts[(i + j) % 3]}])
            out.append((seconds, body["usage"]["completion_tokens"]))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        done = [x for xs in pool.map(client, range(CLIENTS)) for x in xs]
    wall = time.perf_counter() - t0
    latencies = sorted(s for s, _ in done)
    return {"requests": len(latencies), "requests_per_s": len(latencies) / wall,
            "completion_tokens_per_s": sum(n for _, n in done) / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[int(0.95 * (len(latencies) - 1))]}


def _returning_client_ttft(srv: _Server) -> float:
    history = [{"role": "user", "content": "Tell me about lighthouses, ships and the sea in five sentences."}]
    text, _ = srv.chat("pirate", history, max_tokens=96, stream=True)
    history += [{"role": "assistant", "content": text}, {"role": "user", "content": "And what about storms?"}]
    for role in ("terse", "json"):  # other clients, other roles, in between
        srv.chat(role, [{"role": "user", "content": "Name a colour."}], max_tokens=4)
    return srv.chat("pirate", history, max_tokens=4, stream=True)[1]


def bench_server(model: Path, repeat: int, say: Callable[[str], None]) -> dict:
    say("server: throughput, one role vs mixed roles...")
    srv = _Server(model)
    try:
        _load(srv, lambda i, j: "pirate")  # warm up: every role resident, caches hot
        _load(srv, lambda i, j: ROLES[(i + j) % len(ROLES)])
        single, mixed = [], []
        for _ in range(repeat):  # interleaved so noise hits both alike
            single.append(_load(srv, lambda i, j: "pirate"))
            mixed.append(_load(srv, lambda i, j: ROLES[(i + j) % len(ROLES)]))
        say("server: returning multi-turn client, with its KV state...")
        with_state = statistics.median(_returning_client_ttft(srv) for _ in range(repeat))
    finally:
        srv.close()
    say("server: returning multi-turn client, without KV states...")
    srv = _Server(model, kv_cache_bytes=0)
    try:
        without = statistics.median(_returning_client_ttft(srv) for _ in range(repeat))
    finally:
        srv.close()

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    out = {"clients": CLIENTS, "requests_per_run": CLIENTS * PER_CLIENT, "max_tokens": MAX_TOKENS}
    for name, runs in (("one_role", single), ("mixed_roles", mixed)):
        out[name] = {k: med(runs, k) for k in ("requests_per_s", "completion_tokens_per_s", "p50_s", "p95_s")}
    # roles answer at different lengths (terse stops early): tokens/s is the fairer ratio
    out["mixed_vs_one_role_throughput"] = out["mixed_roles"]["requests_per_s"] / out["one_role"]["requests_per_s"]
    out["mixed_vs_one_role_tokens_per_s"] = (out["mixed_roles"]["completion_tokens_per_s"]
                                             / out["one_role"]["completion_tokens_per_s"])
    out["returning_client_ttft_s"] = {"with_kv_state": with_state, "without": without, "speedup": without / with_state}
    return out


def server_rows(r: dict) -> list[tuple[str, str]]:
    rows = []
    for name in ("one_role", "mixed_roles"):
        v = r[name]
        rows.append((f"server, {r['clients']} clients, {name.replace('_', ' ')}",
                     f"{v['requests_per_s']:.2f} req/s, {v['completion_tokens_per_s']:.0f} tok/s, "
                     f"p50 {v['p50_s'] * 1e3:.0f} ms, p95 {v['p95_s'] * 1e3:.0f} ms"))
    rows.append(("server: mixed / one-role, requests/s and tokens/s",
                 f"{r['mixed_vs_one_role_throughput']:.2f}x, {r['mixed_vs_one_role_tokens_per_s']:.2f}x"))
    t = r["returning_client_ttft_s"]
    rows.append(("server: returning client TTFT with / without KV state",
                 f"{t['with_kv_state'] * 1e3:.0f} ms / {t['without'] * 1e3:.0f} ms ({t['speedup']:.1f}x)"))
    return rows
