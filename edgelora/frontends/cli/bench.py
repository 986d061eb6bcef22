"""`edgelora bench`."""

from __future__ import annotations

import json
import time

import click

from edgelora.frontends.cli.options import _model_option


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_model_option
@click.option("--tokens", type=click.IntRange(min=8), default=128, show_default=True, help="Tokens generated per throughput run.")
@click.option("--repeat", type=click.IntRange(min=1), default=None, help="Repetitions, the median is reported [default: 5; 1 with --quick].")
@click.option("--quick", is_flag=True, help="One repetition and 32 tokens (about 1 minute for the core section instead of ~5).")
@click.option("--only", "sections", multiple=True, type=click.Choice(["core", "cpu", "server", "gpu"]),
              help="Run only these sections (repeatable; default: all). cpu: threads, OpenMP wait policy, load, "
                   "extra buffers, probe; server: HTTP throughput one role vs mixed, returning-client TTFT; "
                   "gpu: every layer on the GPU device vs the CPU (logits, speed), skipped without a device.")
def bench(as_json, model, tokens, repeat, sections, quick):
    """Measure switching, attach, generation speed and time to first token (progress on stderr)."""
    from edgelora.bench.run import print_table, run_bench

    repeat = repeat or (1 if quick else 5)
    tokens = 32 if quick and tokens == 128 else tokens
    t0 = time.perf_counter()
    result = run_bench(model=model, n_tokens=tokens, repeat=repeat, sections=sections or None,
                       progress=lambda msg: click.echo(f"[{time.perf_counter() - t0:6.1f} s] {msg}", err=True))
    click.echo(json.dumps(result, indent=2) if as_json else print_table(result))
