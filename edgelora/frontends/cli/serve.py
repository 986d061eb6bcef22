"""`edgelora serve`: the OpenAI-compatible server."""

from __future__ import annotations


import click

from edgelora.errors import EdgeloraError
from edgelora.frontends.cli.options import _engine_options


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; not loopback needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on.")
@click.option("--role-dir", "role_dirs", multiple=True, type=click.Path(file_okay=False), help="Extra roles folder (repeatable).")
@click.option("--preload", multiple=True, metavar="ROLE", help="Load these roles' adapters at start.")
@click.option("--api-key", envvar="EDGELORA_API_KEY", help="Require 'Authorization: Bearer KEY' (env EDGELORA_API_KEY).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN", help="Allow browser pages from this origin (repeatable).")
@click.option("--max-queue", type=click.IntRange(1, 1024), default=16, show_default=True, help="Requests waiting before 503.")
@click.option("--parallel", type=click.IntRange(1, 64), default=None,
              help="Requests answered at once, decoded together, each with its own --ctx [default: 4 per core up to 8, "
                   "fewer if their KV cache would take over a quarter of free memory; `doctor` shows it].")
@click.option("--force", is_flag=True, help="Use roles made for another base (shape checks still run).")
@click.option("--no-prefix-reuse", is_flag=True, help="Evaluate every prompt from scratch: greedy answers repeat exactly (README 'Reproducibility').")
@click.option("--fallback-role", metavar="ROLE", help="Answer requests naming an unknown model (e.g. gpt-4o-mini) with this role "
              "instead of 404 (config key fallback_role).")
@click.option("--quiet", is_flag=True, help="No per-request log line on stderr.")
@_engine_options
def serve(host, port, role_dirs, preload, api_key, cors_origins, max_queue, parallel, force, no_prefix_reuse, fallback_role, quiet,
          model, n_gpu_layers, n_ctx, n_threads, verbose):
    """OpenAI-compatible HTTP server: the request's `model` names the role (base, auto, pirate, a:0.7+b:0.3)."""
    import uvicorn

    from edgelora.config import load_config
    from edgelora.frontends.runtime import open_runtime
    from edgelora.frontends.server.app import Service, build_app, is_loopback, loopback_hosts
    from edgelora.frontends.server.extras import check_cors_origins, check_fallback_role
    from edgelora.frontends.server.http import max_connections_for, uvicorn_settings

    if not is_loopback(host) and not api_key:
        raise click.BadParameter(f"binding {host} (not loopback) needs --api-key", param_hint="--host")
    if (problem := check_cors_origins(cors_origins, api_key)) is not None:
        raise click.BadParameter(problem, param_hint="--cors-origin")
    config = load_config()
    config.roles_dirs = [*config.roles_dirs, *role_dirs]
    roles = open_runtime(config, model=model, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads,
                         verbose=verbose, reuse_prefix=not no_prefix_reuse, preload=preload, force=force,
                         parallel=parallel)
    eng = roles.engine
    fallback_role = fallback_role or config.fallback_role
    try:
        check_fallback_role(roles.catalog, fallback_role)
    except EdgeloraError as exc:
        raise click.BadParameter(str(exc), param_hint="--fallback-role / config fallback_role") from None
    service = Service(eng, roles, max_queue=max_queue, fallback_role=fallback_role)
    app = build_app(service, api_key=api_key, allowed_hosts=loopback_hosts(host) if is_loopback(host) else None,
                    cors_origins=list(cors_origins) or None, request_log=not quiet)
    names = ", ".join(["base", "auto", *roles.catalog.names()])
    click.echo(f"edgelora serve: http://{host}:{port}/v1  model {eng.model_path.name}  roles: {names}", err=True)
    click.echo(f"answers {eng.parallel} requests at once ({eng.parallel_why}), {eng.context_size} tokens of context each, "
               f"up to {eng.lanes} roles decoding side by side; {max_queue} more wait", err=True)
    click.echo(f"web page: http://{host}:{port}/" + (f"  unknown models answered by: {fallback_role}" if fallback_role else ""),
               err=True)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning",
                **uvicorn_settings(max_connections=max_connections_for(max_queue)))
    eng.close()
