"""`edgelora bench --only server`: the HTTP server under load, at 1, 4 and 8 concurrent clients.

- throughput and latency: every client sends a few streamed requests back to back (greedy, 64 tokens,
  ~53-token prompts, each opened by its own request number), all on one role, or mixed (requests alternate base / pirate / terse); per row:
  aggregate completion tokens/s, p50/p95 request latency, p50/p95 time to first token, p50/p95 time
  between tokens after the first (independent of answer lengths, which differ between servers);
  time to first token is also split: the *burst* (every client's first request, all sent at the same
  moment: the last waits for every prompt before it, about clients x one prompt's compute) and the
  *steady* rest (each sent as that client's previous answer ended, while the others were being served);
- with ``peer`` (a llama-server binary): the same workload against llama-server on the same GGUF, every
  role adapter loaded (``--lora``, off until a request's ``lora`` field scales it), side by side;
- a returning multi-turn client: time to first token of its next turn after other clients with other
  roles came in between, with the engine's per-adapter-set KV states vs without (kv_cache_bytes = 0).

One server (and one peer) per client count, started with as many slots as clients, as a user would
run it for that load; rounds alternate one-role / mixed and edgelora / peer so noise hits all alike.
"""

from __future__ import annotations

import itertools
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
from urllib.error import HTTPError

from edgelora.bench.contention import MachineWatch, competing
from edgelora.errors import EdgeloraError

CLIENT_COUNTS = (1, 4, 8)
PER_CLIENT = 4  # requests each client sends back to back, whatever the client count (1 burst, 3 steady)
MAX_TOKENS = 64
CTX_PER_SLOT = 512  # a ~49-token prompt + 64 tokens, and the returning client's ~250-token history
ONE_ROLE = "pirate"
MIXED = ("base", "pirate", "terse")
WORKLOADS = ("one_role", "mixed_roles")
RETURNING_OTHERS = ("terse", "json")  # the roles other clients use between a returning client's turns
STARTUP_S = 120
WARMUP_TOKENS = 4

# ~49 tokens each with SmolLM2's chat template (its default system prompt included)
PROMPTS = (
    "Describe a lighthouse on a rocky coast at night, its keeper and the ships it guides.",
    "Explain how a sailing ship crosses an ocean, what the crew does and how they find their way.",
    "Tell me about a small fishing village by the sea: the harbour, the boats and the weather.",
    "Write a short story about a parrot that reads old treasure maps and helps a crew find gold.",
)


_request_numbers = itertools.count(1)


def request_prompt(i: int, j: int) -> str:
    """Client i's j-th prompt, opened by a number no other request has: the bench repeats 4 prompts,
    and a server keeping the KV cells of earlier conversations (edgelora's saved states; llama-server's
    RAM cache, off here) would otherwise answer the repeats from cache. Each request then reuses at most
    the role's system prompt and the template's start, like a new client's conversation."""
    return f"Request {next(_request_numbers)}. {PROMPTS[(i + j) % len(PROMPTS)]}"


class ServerStartError(EdgeloraError):
    """A server the bench starts (edgelora serve, the peer llama-server) did not come up."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def lora_ids_by_path(listing: list[dict], files: list[Path]) -> dict[Path, int]:
    """llama-server's adapter id for each file, from GET /lora-adapters (entries {"id", "path", ...}),
    matched by resolved path."""
    ids = {Path(entry["path"]).resolve(): int(entry["id"]) for entry in listing}
    missing = [str(f) for f in files if Path(f).resolve() not in ids]
    if missing:
        raise ServerStartError(f"llama-server did not list adapter(s) {', '.join(missing)} in GET /lora-adapters")
    return {Path(f): ids[Path(f).resolve()] for f in files}


def lora_field(ids: dict[Path, int], adapters: list[tuple[Path, float]]) -> list[dict]:
    """A request's ``lora`` for llama-server: every loaded adapter, scaled for the role, 0 for the rest.
    Not an empty list for the base: llama-server then keeps the slot's cache from the previous
    request's adapters (launch_slot_with_task clears it only when the list names scales)."""
    scales = {i: 0.0 for i in ids.values()}
    for f, scale in adapters:
        scales[ids[f]] += scale
    return [{"id": i, "scale": s} for i, s in sorted(scales.items())]


def summarize(done: list[dict], failed: int, wall_s: float) -> dict:
    """One load's figures from its finished requests (``stream_chat`` results)."""
    latencies = [d["latency_s"] for d in done]
    timed = [d for d in done if d["ttft_s"] is not None]  # a request with no content has no first token
    ttfts = [d["ttft_s"] for d in timed]
    tokens = sum(d["completion_tokens"] for d in done)
    out = {"requests": len(done), "failed": failed, "completion_tokens": tokens,
           "completion_tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0}
    # time between tokens after the first: unlike tok/s, it does not depend on how long the answers
    # were (two servers' greedy answers differ in length with their rounding)
    itls = [(d["latency_s"] - d["ttft_s"]) / (d["completion_tokens"] - 1) for d in timed if d["completion_tokens"] > 1]
    burst = [d["ttft_s"] for d in timed if d.get("burst")]
    steady = [d["ttft_s"] for d in timed if d.get("burst") is False]  # unmarked results are neither
    for name, values in (("latency", latencies), ("ttft", ttfts), ("itl", itls), ("ttft_burst", burst),
                         ("ttft_steady", steady)):
        if values:
            out[f"{name}_p50_s"] = percentile(values, 50)
            out[f"{name}_p95_s"] = percentile(values, 95)
    prompt = [d["prompt_tokens"] for d in done if d["prompt_tokens"] is not None]
    if prompt:
        out["prompt_tokens"] = statistics.median(prompt)
    return out


def stream_chat(port: int, body: dict, timeout: float = 300) -> dict:
    """One streamed chat completion: latency, time to the first content, tokens (the usage chunk's,
    else the content chunks counted) and the text."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    req = urlreq.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                         {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, text, chunks, usage = None, "", 0, None
    with urlreq.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            delta = (chunk["choices"][0].get("delta") or {}).get("content") if chunk.get("choices") else None
            if delta:
                first = first if first is not None else time.perf_counter() - t0
                text += delta
                chunks += 1
    usage = usage or {}
    return {"latency_s": time.perf_counter() - t0, "ttft_s": first, "text": text,
            "completion_tokens": usage.get("completion_tokens", chunks), "prompt_tokens": usage.get("prompt_tokens")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """A server child process on a free loopback port, ready when GET /health answers 200."""

    name = "server"

    def __init__(self, argv: list[str], env: dict | None = None):
        self.port = _free_port()
        self.tmp = tempfile.TemporaryDirectory(prefix="edgelora-bench-server-")
        self.log = Path(self.tmp.name) / "server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                urlreq.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return
            except OSError:  # not listening yet, or 503 while loading
                time.sleep(0.2)
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
        self.close()
        raise ServerStartError(f"{self.name} did not start: {' | '.join(tail) or 'no output'}")

    def get(self, path: str):
        with urlreq.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as resp:
            return json.loads(resp.read())

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()


class EdgeloraServer(_Process):
    name = "edgelora serve"

    def __init__(self, model: Path, *, parallel: int, threads: int | None, kv_cache_bytes: int | None = None):
        """``threads`` None: its default thread policy (adaptive: fewer threads while other programs hold cores)."""
        env = dict(os.environ)
        self._cfg = None
        if kv_cache_bytes is not None:
            self._cfg = tempfile.TemporaryDirectory(prefix="edgelora-bench-config-")
            cfg = Path(self._cfg.name) / "config.toml"
            cfg.write_text(f"kv_cache_bytes = {kv_cache_bytes}\n")
            env["EDGELORA_CONFIG"] = str(cfg)
        argv = [sys.executable, "-m", "edgelora", "serve", "-m", str(model), "--ctx", str(CTX_PER_SLOT),
                "--max-queue", "64", "--quiet", "--parallel", str(parallel)]
        argv += ["--threads", str(threads)] if threads else []
        super().__init__(argv, env)

    def body(self, role: str, messages: list[dict], max_tokens: int) -> dict:
        return {"model": role, "messages": messages, "max_tokens": max_tokens, "temperature": 0}

    def close(self):
        super().close()
        if self._cfg is not None:
            self._cfg.cleanup()


class PeerServer(_Process):
    """llama-server on the same GGUF, every role's adapters loaded but off; a request's role becomes its
    ``lora`` scales and the role's system prompt a system message."""

    name = "llama-server"

    def __init__(self, binary: Path, model: Path, roles: dict, *, parallel: int, threads: int):
        self.roles = roles  # name -> (system prompt or None, [(adapter file, scale)])
        files = list(dict.fromkeys(f for _, adapters in roles.values() for f, _ in adapters))
        argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "-c", str(CTX_PER_SLOT * parallel),
                "-np", str(parallel), "-t", str(threads), "-tb", str(threads), "--no-webui",
                # its RAM prompt cache restores a state by tokens only, whatever adapters computed it
                # (DESIGN.md): off, so every answer comes from its own role
                "--cache-ram", "0", "--lora-init-without-apply"]
        for f in files:
            argv += ["--lora", str(f)]
        super().__init__(argv)
        try:
            self.ids = lora_ids_by_path(self.get("/lora-adapters"), files)
        except BaseException:
            self.close()
            raise

    def body(self, role: str, messages: list[dict], max_tokens: int) -> dict:
        system = self.roles[role][0]
        messages = ([{"role": "system", "content": system}] if system else []) + messages
        return {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "lora": lora_field(self.ids, self.roles[role][1])}


def peer_roles(names) -> dict:
    """name -> (system prompt, [(adapter file, scale)]) as `edgelora serve` resolves them (same folders)."""
    from edgelora.config import load_config
    from edgelora.roles.manifest import RoleCatalog
    from edgelora.roles.session import default_folders

    catalog = RoleCatalog(default_folders(load_config()))
    out = {}
    for name in names:
        resolved = catalog.resolve(name)
        out[name] = (resolved.system, [(Path(a.file), scale) for a, scale, _ in resolved.adapters])
    return out


def run_load(srv, clients: int, pick: Callable[[int, int], str], per_client: int, max_tokens: int) -> dict:
    """``clients`` concurrent clients, each sending ``per_client`` requests back to back."""

    def client(i: int) -> list[dict | None]:
        out = []
        for j in range(per_client):
            messages = [{"role": "user", "content": request_prompt(i, j)}]
            try:  # a client's first request leaves with every other client's first: the burst
                out.append({**stream_chat(srv.port, srv.body(pick(i, j), messages, max_tokens)), "burst": j == 0})
            except OSError as exc:  # refused, reset, HTTP error: counted, the load goes on
                out.append({"error": _error_text(exc)})
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for xs in pool.map(client, range(clients)) for x in xs]
    wall = time.perf_counter() - t0
    done = [r for r in results if "error" not in r]
    out = summarize(done, len(results) - len(done), wall)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        out["first_error"] = errors[0]
    return out


def _error_text(exc: OSError) -> str:
    body = exc.read().decode(errors="replace")[:200] if isinstance(exc, HTTPError) else ""
    return f"{exc} {body}".strip()


def _pick(workload: str) -> Callable[[int, int], str]:
    if workload == "one_role":
        return lambda i, j: ONE_ROLE
    return lambda i, j: MIXED[(i + j) % len(MIXED)]


def _returning_client_ttft(srv: EdgeloraServer) -> float:
    history = [{"role": "user", "content": "Tell me about lighthouses, ships and the sea in five sentences."}]
    text = stream_chat(srv.port, srv.body("pirate", history, 96))["text"]
    history += [{"role": "assistant", "content": text}, {"role": "user", "content": "And what about storms?"}]
    for role in RETURNING_OTHERS:  # other clients, other roles, in between
        stream_chat(srv.port, srv.body(role, [{"role": "user", "content": "Name a colour."}], 4))
    return stream_chat(srv.port, srv.body("pirate", history, 4))["ttft_s"]


def _median_of(runs: list[dict]) -> dict:
    """Per key, the median over rounds (failures summed: any is worth seeing)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and all(k in r for r in runs)]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["requests"] = sum(r["requests"] for r in runs)
    out["failed"] = sum(r["failed"] for r in runs)
    errors = [r["first_error"] for r in runs if "first_error" in r]
    if errors:
        out["first_error"] = errors[0]
    return out


RATIO_LABELS = {"completion_tokens_per_s": "tok/s", "latency_p50_s": "latency p50", "latency_p95_s": "p95",
                "ttft_p50_s": "TTFT p50", "ttft_p95_s": "p95", "ttft_burst_p95_s": "TTFT burst p95",
                "ttft_steady_p95_s": "steady p95", "itl_p50_s": "time between tokens p50"}
RATIO_KEYS = tuple(RATIO_LABELS)


def _ratios(ours: dict, peer: dict) -> dict:
    return {k: ours[k] / peer[k] for k in RATIO_KEYS if k in ours and peer.get(k)}


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def bench_server(model: Path, repeat: int, say: Callable[[str], None], peer: Path | None = None, *,
                 client_counts=CLIENT_COUNTS, per_client: int = PER_CLIENT, max_tokens: int = MAX_TOKENS,
                 threads: int | None = None, returning_client: bool = True, load: str = "0") -> dict:
    """``load``: what competes for the CPU during every row: "0", that many busy processes, or
    "edgelora" (a second edgelora generating), as in the contention table. Idle, both servers are
    pinned to the same thread count, like for like; under load each runs as a user starts it:
    edgelora with its default thread policy, llama-server with ``-t`` = the cores (its default)."""
    threads = threads or default_threads()
    roles = peer_roles(sorted({ONE_ROLE, *MIXED})) if peer else {}
    ours_threads = threads if load == "0" else None
    out: dict = {"client_counts": list(client_counts), "requests_per_client": per_client, "max_tokens": max_tokens,
                 "ctx_per_slot": CTX_PER_SLOT, "threads": threads, "one_role": ONE_ROLE, "mixed_roles": list(MIXED),
                 "peer": str(peer) if peer else None, "load": load,
                 "edgelora_threads": ours_threads or "default policy (adaptive)", "rows": []}
    for clients in client_counts:
        say(f"server: {clients} client(s), one role vs mixed roles" + (" vs llama-server" if peer else "") + "...")
        watch = MachineWatch()  # per client count: every row says what else the machine was doing
        sides = {}
        try:
            sides["edgelora"] = EdgeloraServer(model, parallel=clients, threads=ours_threads)
            if peer:
                sides["llama_server"] = PeerServer(peer, model, roles, parallel=clients, threads=threads)
            for srv in sides.values():  # warm up: every client has asked every role, all adapters resident
                run_load(srv, clients, _pick("mixed_roles"), len(MIXED), WARMUP_TOKENS)
            runs = {(w, s): [] for w in WORKLOADS for s in sides}
            with competing(load, model):
                for _ in range(repeat):  # interleaved so noise hits every variant alike
                    for workload in WORKLOADS:
                        for side, srv in sides.items():
                            runs[workload, side].append(run_load(srv, clients, _pick(workload), per_client, max_tokens))
        finally:
            for srv in sides.values():
                srv.close()
        machine = watch.finish()
        for workload in WORKLOADS:
            row = {"clients": clients, "workload": workload, "load": load, "machine": machine}
            for side in sides:
                row[side] = _median_of(runs[workload, side])
            if peer:
                row["edgelora_vs_llama_server"] = _ratios(row["edgelora"], row["llama_server"])
            out["rows"].append(row)
    if returning_client:
        out["returning_client_ttft_s"] = _returning_client(model, repeat, threads, say)
    return out


def _returning_client(model: Path, repeat: int, threads: int, say) -> dict:
    medians = {}
    for name, kv in (("with_kv_state", None), ("without", 0)):
        say(f"server: returning multi-turn client, {name.replace('_', ' ')}...")
        srv = EdgeloraServer(model, parallel=1, threads=threads, kv_cache_bytes=kv)
        try:
            medians[name] = statistics.median(_returning_client_ttft(srv) for _ in range(repeat))
        finally:
            srv.close()
    medians["speedup"] = medians["without"] / medians["with_kv_state"]
    return medians


def _side_text(v: dict) -> str:
    failed = f", {v['failed']} FAILED ({v.get('first_error', '?')})" if v["failed"] else ""
    if "latency_p50_s" not in v:
        return f"no answer{failed}"
    ttft = (f", TTFT p50 {v['ttft_p50_s'] * 1e3:.0f} / p95 {v['ttft_p95_s'] * 1e3:.0f} ms" if "ttft_p50_s" in v else "")
    split = [f"{name} p95 {v[f'ttft_{name}_p95_s'] * 1e3:.0f}" for name in ("burst", "steady") if f"ttft_{name}_p95_s" in v]
    ttft += f" ({', '.join(split)})" if split else ""
    itl = f", between tokens p50 {v['itl_p50_s'] * 1e3:.1f} ms" if "itl_p50_s" in v else ""
    return (f"{v['completion_tokens_per_s']:.0f} tok/s, latency p50 {v['latency_p50_s'] * 1e3:.0f} / "
            f"p95 {v['latency_p95_s'] * 1e3:.0f} ms{ttft}{itl}{failed}")


def _load_text(load: str) -> str:
    return "a second edgelora generating" if load == "edgelora" else f"{load} busy process(es)"


def server_rows(r: dict) -> list[tuple[str, str]]:
    rows = []
    for row in r["rows"]:
        m = row["machine"]
        loaded = row.get("load", "0") != "0"
        state = ("otherwise " if loaded else "") + ("idle" if m["idle"] else "busy")  # others_cpu leaves out the bench's own load
        load = (f"[machine {state}, load {m['load_before']:.1f}"
                + (f", others {m['others_cpu']:.2f} cores]" if "others_cpu" in m else "]"))
        label = f"server, {row['clients']} client(s), {row['workload'].replace('_', ' ')}"
        if loaded:
            label += f", against {_load_text(row['load'])}"
        rows.append((f"{label}: edgelora", f"{_side_text(row['edgelora'])} {load}"))
        if "llama_server" in row:
            rows.append((f"{label}: llama-server", _side_text(row["llama_server"])))
            ratio = row["edgelora_vs_llama_server"]
            parts = [f"{RATIO_LABELS[k]} {v:.2f}x" for k, v in ratio.items()]
            rows.append((f"{label}: edgelora / llama-server", ", ".join(parts)))
    t = r.get("returning_client_ttft_s")
    if t:
        rows.append(("server: returning client TTFT with / without KV state",
                     f"{t['with_kv_state'] * 1e3:.0f} ms / {t['without'] * 1e3:.0f} ms ({t['speedup']:.1f}x)"))
    return rows
