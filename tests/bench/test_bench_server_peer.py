"""`edgelora bench --only server --peer-llama-server`: the same workload on edgelora and llama-server, small.

Needs a llama-server binary (README 'Benchmark' says how to build one): EDGELORA_PEER_LLAMA_SERVER, else
the cached build from llama-cpp-python's vendored llama.cpp; skipped, saying so, without one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgelora.bench.server import (PROMPTS, PeerServer, bench_server, default_threads, peer_roles, server_rows,
                                   stream_chat)

CACHED = Path.home() / ".cache/edgelora-peer/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"


def _peer_binary() -> Path:
    path = Path(os.environ.get("EDGELORA_PEER_LLAMA_SERVER") or CACHED)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(f"no llama-server binary at {path} (set EDGELORA_PEER_LLAMA_SERVER; README 'Benchmark' builds one)")
    return path


@pytest.mark.slow
def test_both_servers_answer_every_request_of_the_same_workload(smol_path):
    peer = _peer_binary()
    r = bench_server(smol_path, 1, lambda _msg: None, peer=peer, client_counts=(2,), per_client=2, max_tokens=8,
                     returning_client=False)
    assert [(row["clients"], row["workload"]) for row in r["rows"]] == [(2, "one_role"), (2, "mixed_roles")]
    for row in r["rows"]:
        for side in ("edgelora", "llama_server"):
            assert row[side]["requests"] == 4 and row[side]["failed"] == 0, (side, row[side])
            assert row[side]["completion_tokens_per_s"] > 0 and row[side]["ttft_p50_s"] > 0
            # each client's first request is the burst, its second a steady one
            assert row[side]["ttft_burst_p95_s"] > 0 and row[side]["ttft_steady_p95_s"] > 0
        # the same prompts on both sides: the chat template renders them alike
        assert row["edgelora"]["prompt_tokens"] == row["llama_server"]["prompt_tokens"]
        assert row["edgelora_vs_llama_server"]["completion_tokens_per_s"] > 0
        assert "idle" in row["machine"]
    table = dict(server_rows(r))
    assert "server, 2 client(s), mixed roles: edgelora / llama-server" in table
    assert "burst p95" in table["server, 2 client(s), one role: edgelora"]


@pytest.mark.slow
def test_the_peer_answers_a_role_with_its_adapter_and_the_base_without(smol_path):
    srv = PeerServer(_peer_binary(), smol_path, peer_roles(["base", "pirate"]), parallel=1, threads=default_threads())
    try:
        messages = [{"role": "user", "content": PROMPTS[0]}]
        base = stream_chat(srv.port, srv.body("base", messages, 24))["text"]
        pirate = stream_chat(srv.port, srv.body("pirate", messages, 24))["text"]
        base_again = stream_chat(srv.port, srv.body("base", messages, 24))["text"]
    finally:
        srv.close()
    assert base and pirate and pirate != base  # the request's lora field took effect
    assert base_again == base  # and was taken off again: no KV from the pirate request reused
