"""Loading the base: resolve and check it before llama.cpp sees it, then load it through the handle.

llama.cpp asserts (kills the process) on some malformed models and only says "failed" on others,
so the file is read and checked first, and a failed load is explained from the file and the log."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jinja2

from edgelora.errors import AdapterError, EdgeloraError, ModelError
from edgelora.models.gguf_info import GGUFInfo, read_gguf, validate_base_model
from edgelora.runtime import native_log
from edgelora.runtime import offload
from edgelora.runtime.llama import LlamaHandle

DEFAULT_CTX = 2048


def read_base(model_path: Path) -> GGUFInfo:
    """The base's metadata and tensor shapes, refused with one line if it is not a base llama.cpp can load."""
    try:
        base = read_gguf(model_path)
    except AdapterError as exc:  # not a GGUF at all: a model error here, not an adapter's
        raise ModelError(str(exc)) from None
    if base.metadata.get("general.type") == "adapter":
        raise ModelError(f"{model_path} is a LoRA adapter, not a base model; pass it with --adapter")
    validate_base_model(base)  # what llama.cpp asserts on would kill the process
    return base


def check_ctx(base: GGUFInfo, model_path: Path, n_ctx: int | None) -> int:
    """The context size: ``n_ctx``, or by default 2048 tokens (less if the model was trained for less)."""
    trained = base.metadata.get(f"{base.architecture}.context_length")
    limit = int(trained) if isinstance(trained, int) and 0 < trained < (1 << 24) else 1 << 17
    if n_ctx is None:
        return min(DEFAULT_CTX, limit)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 16 <= n_ctx <= limit:
        raise EdgeloraError(f"--ctx {n_ctx}: must be 16 to {limit} (the context {model_path.name} was trained for)")
    return n_ctx


@dataclass
class Loaded:
    llama: LlamaHandle
    offload: offload.Offload  # what llama.cpp did with n_gpu_layers, from its own log
    load_s: float


MAX_PARALLEL = 64  # llama.cpp's own limit on sequences per context (LLAMA_MAX_SEQ) is 256; past a few dozen on a CPU nothing gains


MAX_DEFAULT_PARALLEL = 8  # on a 2-core CPU 8 sequences give ~1.8x one; the curve is flat past that
KV_SHARE_OF_MEMORY = 0.25  # the most of the memory available now the sequences' KV cells may take by default
# Adapter sets decoded at once without switching (a context each; bench's mixed load is base/pirate/terse).
MAX_LANES = 3


def check_parallel(parallel: int) -> int:
    if isinstance(parallel, bool) or not isinstance(parallel, int) or not 1 <= parallel <= MAX_PARALLEL:
        raise EdgeloraError(f"--parallel {parallel!r}: must be a whole number from 1 to {MAX_PARALLEL}")
    return parallel


def kv_bytes_per_token(base: GGUFInfo) -> int:
    """KV cache bytes one token takes (f16 keys and values, every layer)."""
    meta, arch = base.metadata, base.architecture
    layers = int(meta.get(f"{arch}.block_count", 0) or 0)
    heads = int(meta.get(f"{arch}.attention.head_count", 1) or 1)
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads) or heads)
    width = int(meta.get(f"{arch}.embedding_length", 0) or 0)
    k = int(meta.get(f"{arch}.attention.key_length", width // heads) or 0)
    v = int(meta.get(f"{arch}.attention.value_length", k) or 0)
    return max(1, layers * kv_heads * (k + v) * 2)


def default_parallel(base: GGUFInfo, n_ctx: int, cores: int, available_bytes: int | None) -> tuple[int, str]:
    """Sequences `serve` decodes together by default, and why: 4 per core up to 8 (batching more
    gains little on a CPU), fewer when their KV cells would take over a quarter of the free memory."""
    by_cores = min(MAX_DEFAULT_PARALLEL, 4 * max(1, cores))
    per_seq = kv_bytes_per_token(base) * n_ctx
    if available_bytes is None:
        return by_cores, f"{cores} cores"
    by_memory = max(1, int(available_bytes * KV_SHARE_OF_MEMORY // per_seq))
    n = min(by_cores, by_memory)
    why = f"{cores} cores" if n == by_cores else f"KV {per_seq / 2**20:.0f} MiB a sequence, {available_bytes / 2**30:.1f} GiB free"
    return n, why


def default_lanes(base: GGUFInfo, n_ctx: int, parallel: int, available_bytes: int | None) -> int:
    """llama.cpp contexts the scheduler may make, one per adapter set running at once (scheduler.py):
    up to MAX_LANES and never more than the sequences, while their KV cells (each context holds
    ``parallel`` sequences) fit in the share of free memory ``default_parallel`` gives KV."""
    per_lane = kv_bytes_per_token(base) * n_ctx * parallel
    by_memory = MAX_LANES if available_bytes is None else max(1, int(available_bytes * KV_SHARE_OF_MEMORY // per_lane))
    return min(MAX_LANES, parallel, by_memory)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load(model_path: Path, *, n_gpu_layers: int, n_ctx: int, n_threads: int, n_batch: int, seed: int,
         verbose: bool, extra_buffers: bool, n_seq: int = 1, flash_attn: bool | None = None) -> Loaded:
    t0 = time.perf_counter()
    try:
        with native_log.capture() as load_log:
            llama = LlamaHandle(model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads,
                                n_batch=n_batch, seed=seed, verbose=verbose, extra_buffers=extra_buffers,
                                n_seq=n_seq, flash_attn=flash_attn)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(_why_not_a_model(model_path, exc)) from None
    except jinja2.TemplateError as exc:  # llama-cpp-python compiles the model's chat templates at load
        raise ModelError(f"{model_path}: its chat template does not compile ({exc})") from None
    return Loaded(llama, offload.parse(load_log), time.perf_counter() - t0)


def _why_not_a_model(path: Path, exc: Exception) -> str:
    """llama.cpp only says it failed; look at the file to say why."""
    try:
        meta = read_gguf(path).metadata
    except AdapterError as err:  # not a GGUF at all
        return str(err)
    if meta.get("general.type") == "adapter":
        return f"{path} is a LoRA adapter, not a base model; pass it with --adapter"
    log = native_log.recent(2)
    return f"{path}: llama.cpp could not load it ({log or exc}; run with -v for its log)"
