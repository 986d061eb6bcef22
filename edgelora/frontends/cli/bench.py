"""`edgelora bench`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from edgelora.bench.contention import LOADS
from edgelora.frontends.cli.options import _model_option


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_model_option
@click.option("--tokens", type=click.IntRange(min=8), default=128, show_default=True, help="Tokens generated per throughput run.")
@click.option("--repeat", type=click.IntRange(min=1), default=None, help="Repetitions, the median is reported [default: 5; 1 with --quick].")
@click.option("--quick", is_flag=True, help="The core section only (unless --only), one repetition, 32 tokens: README 'Benchmark' says how long.")
@click.option("--only", "sections", multiple=True, type=click.Choice(["core", "cpu", "server", "gpu"]),
              help="Run only these sections (repeatable; default: all). cpu: contention table, threads, OpenMP wait policy, load, "
                   "extra buffers, probe; server: HTTP throughput and latency at 1/4/8 clients, one role vs mixed, returning-client TTFT; "
                   "gpu: every layer on the GPU device vs the CPU (logits, speed), skipped without a device.")
@click.option("--peer-llama-server", "peer", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A llama-server binary: the server section runs the same workload against it, side by side (README 'Benchmark').")
@click.option("--server-load", type=click.Choice(LOADS), default="0", show_default=True,
              help="The server section under load: that many busy processes, or a second edgelora generating, during "
                   "every row; edgelora then runs with its default thread policy, llama-server with -t = the cores.")
def bench(as_json, model, tokens, repeat, sections, quick, peer, server_load):
    """Measure switching, attach, generation speed and time to first token (progress on stderr)."""
    from edgelora.bench.run import print_table, run_bench

    repeat = repeat or (1 if quick else 5)
    sections = sections or (("core",) if quick else ())  # --quick alone: the core section only
    tokens = 32 if quick and tokens == 128 else tokens
    if peer is not None:
        if sections and "server" not in sections:
            raise click.BadParameter("it compares the server section: add --only server", param_hint="--peer-llama-server")
        if not os.access(peer, os.X_OK):
            raise click.BadParameter(f"{peer} is not executable", param_hint="--peer-llama-server")
    if server_load != "0" and sections and "server" not in sections:
        raise click.BadParameter("it loads the server section: add --only server", param_hint="--server-load")
    t0 = time.perf_counter()
    result = run_bench(model=model, n_tokens=tokens, repeat=repeat, sections=sections or None, peer_llama_server=peer,
                       server_load=server_load,
                       progress=lambda msg: click.echo(f"[{time.perf_counter() - t0:6.1f} s] {msg}", err=True))
    click.echo(json.dumps(result, indent=2) if as_json else print_table(result))
