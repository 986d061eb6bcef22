"""`edgelora doctor`: what this machine, build and model can do."""

from __future__ import annotations

import json

import click

from edgelora.errors import EdgeloraError
from edgelora.frontends.cli.options import _model_option


@click.command()
@_model_option
@click.option("--n-gpu-layers", "n_gpu_layers", type=click.IntRange(min=-1), default=0, show_default=True,
              help="Also load the model with this many layers offloaded and report where llama.cpp put them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (stable field names).")
def doctor(model, n_gpu_layers, as_json):
    """Versions, llama.cpp backend build, GPU devices and offload, and the default model."""
    import importlib.metadata
    import platform

    from edgelora.runtime.backend import backend_info
    from edgelora.models.gguf_info import read_gguf
    from edgelora.files import sha256_file
    from edgelora.models.catalog import resolve_model

    b = backend_info()
    report = {
        "edgelora": importlib.metadata.version("edgelora"),
        "python": platform.python_version(),
        "llama_cpp_python": b.llama_cpp_python,
        "gguf": importlib.metadata.version("gguf"),
        "backend": b.build,
        "ggml_backends": list(b.backends),
        "gpu_offload": b.gpu_offload,
        "devices": [d.as_dict() for d in b.devices],
        "system_info": b.system_info,
    }
    try:
        path = resolve_model(model)
        info = read_gguf(path)
        report["cpu"] = _cpu_report(path, info)
        report["model"] = {
            "path": str(path),
            "name": info.name,
            "architecture": info.architecture,
            "size_bytes": info.size,
            "sha256": sha256_file(path),
        }
        report["serve_parallel"] = _parallel_report(path, info)
        if n_gpu_layers:
            report["offload"] = _offload_report(path, n_gpu_layers)
    except EdgeloraError as exc:
        report["model"] = {"error": str(exc)}
    report["routing_model"] = _routing_model_report()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    width = max(map(len, report))
    for key, value in report.items():
        if key == "devices":
            value = [f"{d['name']} ({d['description']}, {d['type']}, {d['memory_total_mib']} MiB)" for d in value]
        if isinstance(value, dict):
            for k, v in value.items():
                if k == "devices" and isinstance(v, list):  # offload.devices
                    v = ", ".join(f"{d['name']} ({d['description']})" for d in v) or "none"
                elif isinstance(v, dict):  # offload.model_buffers_mib
                    v = ", ".join(f"{name} {size} MiB" for name, size in v.items())
                click.echo(f"{(key + '.' + k):<{width + 16}}  {_doctor_text(key + '.' + k, v)}")
        else:
            click.echo(f"{key:<{width + 16}}  {', '.join(value) if isinstance(value, list) else value}")
    if "cpu" in report and not report["cpu"]["extra_buffers"]:
        click.echo(f"\nllama.cpp's extra CPU buffers (weight repacking, AMX) are off: {report['cpu']['reason']}.")
    if not report["routing_model"]["installed"]:
        click.echo(f"\n--role auto routes by word overlap only: {report['routing_model']['error']}.")
    if b.build == "CPU":
        click.echo("\nThis llama.cpp build runs on the CPU only; see README 'GPU offload' to build with CUDA, Metal or Vulkan.")
    elif not b.offload_devices:
        click.echo(f"\nThis llama.cpp build ({b.build}) sees no GPU device, so layers stay on the CPU"
                   + ("; a software Vulkan device (llvmpipe) is used only with GGML_VK_VISIBLE_DEVICES=0." if "Vulkan" in b.backends else "."))


DOCTOR_UNSET_TEXT = {"cpu.probe_s": "not run", "cpu.omp_wait_policy": "default (unset)",
                     "cpu.gomp_spincount": "default (unset)"}


def _doctor_text(key: str, value):
    return DOCTOR_UNSET_TEXT[key] if value in (None, "") and key in DOCTOR_UNSET_TEXT else value


def _routing_model_report() -> dict:
    """Whether the sentence-embedding model `--role auto` routes with is installed (nothing is loaded)."""
    from edgelora.routing.embedder import DIST, EmbedderMissing, model_dir

    try:
        return {"installed": True, "package": DIST, "path": str(model_dir())}
    except EmbedderMissing as exc:
        return {"installed": False, "package": DIST, "error": str(exc)}


def _why_no_offload() -> str:
    from edgelora.runtime.backend import backend_info

    b = backend_info()
    if b.build == "CPU":  # no GPU backend registered (gpu_offload is also false for a GPU build with no device)
        return "this llama.cpp build is CPU-only; README 'GPU offload'"
    if "Vulkan" in b.backends and not b.offload_devices:
        return "no Vulkan GPU visible; a software device (llvmpipe) needs GGML_VK_VISIBLE_DEVICES=0"
    return f"llama.cpp's {b.build} build found no usable device"


def _offload_report(model_path, n_gpu_layers) -> dict:
    """Load the model with n_gpu_layers and report what llama.cpp did (devices, layers, buffers)."""
    from edgelora import Engine

    eng = Engine(model_path, n_gpu_layers=n_gpu_layers, n_ctx=256)
    try:
        return {"requested": n_gpu_layers, **eng.offload.as_dict()}
    finally:
        eng.close()


def _parallel_report(path, info) -> dict:
    """What `serve` answers at once by default (scheduler.py), and why."""
    from edgelora.runtime import loading
    from edgelora.safety import cpu

    n_ctx = loading.check_ctx(info, path, None)
    free = loading.available_memory()
    n, why = loading.default_parallel(info, n_ctx, cpu.default_threads(), free)
    return {"sequences": n, "why": why, "ctx_each": n_ctx,
            "kv_bytes": n * n_ctx * loading.kv_bytes_per_token(info),
            "lanes": loading.default_lanes(info, n_ctx, n, free)}


def _cpu_report(model_path, info) -> dict:
    """Which CPU kernel path llama.cpp takes here and why (may run the one-time probe)."""
    import os

    from edgelora.config import load_config
    from edgelora.runtime import thread_policy
    from edgelora.safety import cpu

    config = load_config()
    setting, where = cpu.configured_setting(config.cpu_extra_buffers)
    path = cpu.decide(model_path, setting, file_type=info.metadata.get("general.file_type"), where=where)
    return {**path.as_dict(), "features": cpu.cpu_features(), "amx": cpu.has_amx(),
            "threads": cpu.check_threads(config.threads), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", ""), **thread_policy.doctor_report(config.threads)}
