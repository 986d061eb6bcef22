"""`edgelora bench --only server`: the pure parts of the HTTP load measurement and its peer flag."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgelora.bench.server import (PROMPTS, request_prompt, ServerStartError, lora_field, lora_ids_by_path, peer_roles, percentile,
                                   stream_chat,
                                   summarize)
from edgelora.frontends.cli.main import main
from edgelora.roles.manifest import bundled_dir


@pytest.mark.parametrize("values", [[3.0], [1.0, 2.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 7, 24) ** 2)])
@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_interpolates_between_closest_ranks_like_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_of_nothing_is_an_error_not_a_number():
    with pytest.raises(ValueError):
        percentile([], 50)


def test_llama_server_adapter_ids_are_matched_by_resolved_path(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "sub" / "b.gguf"
    listing = [{"id": 0, "path": str(tmp_path / "sub" / ".." / "a.gguf"), "scale": 0.0},
               {"id": 1, "path": str(b), "scale": 0.0}]
    assert lora_ids_by_path(listing, [b, a]) == {b: 1, a: 0}


def test_an_adapter_llama_server_did_not_load_is_named_in_one_line(tmp_path):
    with pytest.raises(ServerStartError, match=r"did not list adapter\(s\) .*c\.gguf") as err:
        lora_ids_by_path([{"id": 0, "path": str(tmp_path / "a.gguf")}], [tmp_path / "c.gguf"])
    assert "\n" not in str(err.value)


def test_the_base_role_sends_every_adapter_at_scale_zero_not_an_empty_list():
    ids = {Path("p.gguf"): 0, Path("t.gguf"): 1}
    assert lora_field(ids, []) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    assert lora_field(ids, [(Path("t.gguf"), 0.7)]) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.7}]


def test_a_load_summary_counts_tokens_over_wall_time_and_failures():
    done = [{"latency_s": 1.0, "ttft_s": 0.1, "completion_tokens": 64, "prompt_tokens": 49},
            {"latency_s": 2.0, "ttft_s": None, "completion_tokens": 0, "prompt_tokens": 50},
            {"latency_s": 3.0, "ttft_s": 0.3, "completion_tokens": 32, "prompt_tokens": None}]
    s = summarize(done, failed=1, wall_s=4.0)
    assert s["requests"] == 3 and s["failed"] == 1 and s["completion_tokens"] == 96
    assert s["completion_tokens_per_s"] == 24.0
    assert s["latency_p50_s"] == 2.0 and s["latency_p95_s"] == pytest.approx(2.9)
    assert s["ttft_p50_s"] == pytest.approx(0.2)  # a request with no content has no first token
    assert s["prompt_tokens"] == 49.5
    # between tokens: (1.0 - 0.1) / 63 and (3.0 - 0.3) / 31; the request with no first token has none
    assert s["itl_p50_s"] == pytest.approx((0.9 / 63 + 2.7 / 31) / 2)


def test_time_to_first_token_is_split_into_the_burst_and_the_steady_requests():
    """Every client's first request leaves at the same moment (the last of them waits for all their
    prompts); the rest leave as that client's answer ends. Their p95s are reported apart."""
    done = [{"latency_s": 1.0, "ttft_s": t, "completion_tokens": 8, "prompt_tokens": 49, "burst": burst}
            for t, burst in ((0.40, True), (0.44, True), (0.15, False), (0.17, False), (0.25, False))]
    s = summarize(done, failed=0, wall_s=2.0)
    assert s["ttft_burst_p50_s"] == pytest.approx(0.42) and s["ttft_burst_p95_s"] == pytest.approx(0.438)
    assert s["ttft_steady_p50_s"] == pytest.approx(0.17) and s["ttft_steady_p95_s"] == pytest.approx(0.242)
    assert s["ttft_p95_s"] == pytest.approx(0.432)  # over every request, as before
    assert "ttft_burst_p50_s" not in summarize([{**d, "burst": False} for d in done], 0, 2.0)


def test_no_two_bench_requests_share_more_than_the_system_prompt_and_template():
    """The 4 prompts repeat across clients and rounds; a server that keeps earlier conversations' cells
    would answer a repeat from cache (edgelora's saved states did: TTFT 19 ms), so each request opens
    with a number of its own."""
    prompts = [request_prompt(i, j) for i in range(8) for j in range(3)] + [request_prompt(0, 0)]
    assert len(set(prompts)) == len(prompts)
    assert len({p.split(". ", 1)[0] for p in prompts}) == len(prompts)  # they differ from the start
    assert {p.split(". ", 1)[1] for p in prompts} == set(PROMPTS)


def test_peer_roles_are_the_adapter_files_and_system_prompts_the_server_resolves():
    roles = peer_roles(["base", "pirate", "terse"])
    assert roles["base"] == (None, [])
    system, adapters = roles["pirate"]
    assert adapters == [((bundled_dir() / "pirate.gguf").resolve(), 1.0)]
    assert len(set(PROMPTS)) == len(PROMPTS)


def test_peer_flag_without_the_server_section_is_a_one_line_usage_error(tmp_path, capsys):
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert main(["bench", "--only", "core", "--peer-llama-server", str(binary)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--peer-llama-server" in err and "--only server" in err and "\n" not in err


def test_a_peer_binary_that_is_not_executable_is_a_one_line_usage_error(tmp_path, capsys):
    binary = tmp_path / "llama-server"
    binary.write_text("not a program")
    assert main(["bench", "--only", "server", "--peer-llama-server", str(binary)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not executable" in err and str(binary) in err and "\n" not in err


def test_rounds_are_reported_as_medians_with_requests_and_failures_summed():
    from edgelora.bench.server import _median_of

    rounds = [{"requests": 4, "failed": 0, "completion_tokens_per_s": 10.0},
              {"requests": 3, "failed": 1, "completion_tokens_per_s": 30.0, "first_error": "HTTP Error 503"}]
    out = _median_of(rounds)
    assert out == {"requests": 7, "failed": 1, "completion_tokens_per_s": 20.0, "first_error": "HTTP Error 503"}


def test_server_load_without_the_server_section_is_a_one_line_usage_error(capsys):
    assert main(["bench", "--only", "core", "--server-load", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--server-load" in err and "--only server" in err and "\n" not in err


@pytest.mark.slow
def test_under_load_the_bench_runs_our_server_with_its_default_thread_policy_which_gives_way(smol_path):
    """`--server-load 1`: a busy process competes during the rows and edgelora serve runs as a user starts
    it (no --threads): its adaptive policy leaves the busy core alone (pinned to 2 threads, every decode
    would wait at llama.cpp's barriers for a thread the busy process holds)."""
    from edgelora.bench.contention import competing
    from edgelora.bench.server import EdgeloraServer, bench_server, server_rows
    from edgelora.safety import cpu

    r = bench_server(smol_path, 1, lambda _msg: None, client_counts=(1,), per_client=1, max_tokens=4,
                     returning_client=False, load="1")
    assert r["load"] == "1" and r["edgelora_threads"] == "default policy (adaptive)"
    assert [row["load"] for row in r["rows"]] == ["1", "1"] and all(row["edgelora"]["failed"] == 0 for row in r["rows"])
    table = dict(server_rows(r))
    assert "machine otherwise " in table["server, 1 client(s), one role, against 1 busy process(es): edgelora"]

    srv = EdgeloraServer(smol_path, parallel=1, threads=None)  # what the bench starts under load
    try:
        with competing("1", smol_path):
            stream_chat(srv.port, srv.body("pirate", [{"role": "user", "content": PROMPTS[0]}], 24))
            threads = srv.get("/props")["edgelora"]["threads"]
    finally:
        srv.close()
    cores = cpu.default_threads()
    assert threads["policy"] == "adaptive" and threads["other_programs_cpu"] >= 0.6, threads
    assert threads["generation"] <= cores - 1, threads  # the busy process keeps its core
