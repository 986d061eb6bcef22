"""The engine: one base model, LoRA adapters switched at runtime, KV-safe generation.

The base is loaded once, memory-mapped, through the llama.cpp handle (llama.py). Adapters go
through llama.cpp's own adapter API, so any number can be attached, re-weighted and detached
without a reload. Setting adapters does not touch the KV cache, and ``generate`` reuses the longest
matching token prefix, so the KV cache remembers which adapter set computed its tokens (kv.py).

What lives here: the adapter table, the gate (one holder at a time), cancellation and lifecycle.
Loading (loading.py), chat templates (template.py), the token loop (generate.py), sampling options
(sampling.py) and adapter records (adapters.py) are their own modules. This module knows nothing of
roles, the CLI or the TUI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgelora.errors import AdapterError, ContextLengthError, UnknownAdapterError
from edgelora.models.catalog import resolve_model
from edgelora.models.gguf_info import GGUFInfo
from edgelora.config import load_config
from edgelora.safety import admission
from edgelora.runtime import adapters as slots
from edgelora.runtime import loading, native_log
from edgelora.runtime.adapters import Adapter, check_scale as _check_scale
from edgelora.runtime.backend import backend_info
from edgelora.runtime.gate import Gate
from edgelora.runtime.generate import STARTED, Completion, Stream, TokenLoop
from edgelora.runtime.kv import KVStateCache
from edgelora.runtime.sampling import _sampling_options
from edgelora.runtime.scheduler import SamplerSettings, Scheduler, SeqRequest
from edgelora.runtime.template import ChatTemplate
from edgelora.runtime import thread_policy
from edgelora.safety import cpu
from edgelora.safety import gpu_adapters


class Engine:
    """One loaded base model plus any number of LoRA adapters switched at runtime.

    >>> eng = Engine()                       # embedded SmolLM2 default
    >>> eng.attach("adapters/x.gguf", name="x", scale=1.0)
    >>> eng.chat([{"role": "user", "content": "hi"}], max_tokens=32).text
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        n_gpu_layers: int = 0,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        kv_cache_bytes: int = 256 << 20,
        verbose: bool = False,
        cpu_extra_buffers: str | None = None,
        reuse_prefix: bool = True,
        config=None,
        threads_pinned_by: str = "threads argument",
        parallel: int | None = 1,
        flash_attn: bool | None = None,
        lanes: int | None = None,
    ):
        """``n_threads`` None: adaptive, every core when idle and fewer under competing work (thread_policy.py); a number pins it. ``cpu_extra_buffers``: 'auto'
        (probe this host once, in a child process), 'on' or 'off'; None reads the config/environment.
        ``reuse_prefix`` False evaluates every prompt from scratch: greedy answers then repeat exactly
        (llama.cpp's CPU kernels round differently for different batch sizes, so a prompt evaluated
        partly from cache can flip a near-tie; README 'Reproducibility'). ``config``: whose signature
        policy adapters are admitted under (``engine.config``); None reads the user's config file once,
        here, so ``require_signatures`` holds for adapters attached from Python too. Nothing below the
        engine reads the config: thread counts and the extra-buffers setting come from the caller.
        ``parallel``: sequences decoded together (each with ``n_ctx`` tokens of its own; scheduler.py):
        the server's concurrent requests, the TUI's compare; 1 for one conversation; None: by cores
        and free memory (``loading.default_parallel``). ``flash_attn``: None is on for CPU, off with
        layers on a device (llama.py says why). ``lanes``: llama.cpp contexts on the model, one per
        adapter set decoding at once (scheduler.py); None: up to 3 as memory allows (``loading.default_lanes``)."""
        native_log.set_verbose(verbose)
        self.model_path = resolve_model(model)
        self._base: GGUFInfo | None = loading.read_base(self.model_path)
        threads = thread_policy.for_engine(n_threads, threads_pinned_by)  # pinned, else adaptive per decode
        n_threads = threads.initial
        n_ctx = loading.check_ctx(self.base, self.model_path, n_ctx)
        gpu_adapters.setting()  # a bad EDGELORA_GPU_ADAPTERS is an error on every build, not only with a GPU
        # Decided before loading, outside this process when unknown: a crash here would kill the user's.
        self.cpu_path = cpu.decide(self.model_path, cpu_extra_buffers, self.base.metadata.get("general.file_type"))
        self.n_threads = n_threads
        self.reuse_prefix = reuse_prefix
        self.config = config if config is not None else load_config()  # the Python API's front door
        self.n_gpu_layers = n_gpu_layers
        self._gate = Gate()  # one holder at a time; see gate.py and README 'Threads'
        self._resident: dict[str, Adapter] = {}
        self._active: dict[str, float] = {}  # name -> scale, in attach order
        self.last: Completion | None = None
        self._retired: list[Adapter] = []  # freed by the caller while a running sequence still used them
        if parallel is None:  # by cores and free memory (serve's default)
            parallel, self.parallel_why = loading.default_parallel(self.base, n_ctx, cpu.default_threads(),
                                                                   loading.available_memory())
        else:
            self.parallel_why = "given"
        self.parallel = loading.check_parallel(parallel)
        loaded = loading.load(self.model_path, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, n_threads=n_threads,
                              n_batch=n_batch, seed=seed, verbose=verbose, extra_buffers=self.cpu_path.extra_buffers,
                              n_seq=self.parallel, flash_attn=flash_attn)
        self.llama, self.offload, self.load_s = loaded.llama, loaded.offload, loaded.load_s
        # Every generation is a sequence of the scheduler; it files KV cells by the adapter set that computed them.
        if lanes is None:
            lanes = loading.default_lanes(self.base, n_ctx, self.parallel, loading.available_memory())
        self.lanes = lanes
        self.scheduler = Scheduler(self.llama, kv_cache_bytes=kv_cache_bytes, threads=threads, lanes=lanes)
        self._gpu_adapters_checked = False
        self._template = ChatTemplate(self.llama, self.model_path)

    @property
    def threads(self) -> thread_policy.ThreadPolicy:
        """Chooses each decode's thread count (thread_policy.py)."""
        return self.scheduler.threads

    @threads.setter
    def threads(self, policy: thread_policy.ThreadPolicy) -> None:
        self.scheduler.threads = policy

    @property
    def base(self) -> GGUFInfo:
        """The base's metadata and tensor shapes."""
        return self._base

    @property
    def kv_states(self) -> KVStateCache:
        """KV states saved under other adapter sets in this conversation. A budget of 0 disables."""
        return self.scheduler.saved

    @property
    def architecture(self) -> str:
        return self.llama.metadata.get("general.architecture", "")

    @property
    def n_layers(self) -> int:
        return int(self.llama.metadata.get(f"{self.architecture}.block_count", 0))

    @property
    def gpu_layers(self) -> int:
        """Layers llama.cpp actually put on a device (0 on a CPU-only build or with no visible device)."""
        return self.offload.layers if self.offload.on_device else 0

    def _adapters_may_go_to_a_device(self) -> bool:
        """Layers are on a device, or may be: a GPU build asked for layers whose log did not say where
        they went (a llama.cpp that words it differently) is checked as if they were."""
        if self.gpu_layers:
            return True
        return bool(self.n_gpu_layers) and not self.offload.reported and bool(backend_info().offload_devices)

    @property
    def device(self) -> str:
        """'CPU', or e.g. 'Vulkan0 (llvmpipe): 31/31 layers' (llama.cpp's count includes the output layer)."""
        return self.offload.label

    @property
    def context_size(self) -> int:
        """Tokens the context holds (0 once closed)."""
        return self.llama.n_ctx() if self.llama is not None else 0

    @property
    def context_used(self) -> int:
        """Tokens whose KV cells the last generation's sequence holds (0 once closed)."""
        return len(self.scheduler.last_slot.tokens) if self.llama is not None else 0

    # ------------------------------------------------------------------ adapters

    @property
    def active(self) -> dict[str, float]:
        """Attached adapters and their scales, in attach order."""
        return dict(self._active)

    @property
    def resident(self) -> dict[str, Adapter]:
        """Adapters loaded in memory (attached or not)."""
        return dict(self._resident)

    def load(self, path: str | os.PathLike, name: str | None = None, *, sha256: str | None = None,
             force: bool = False, config=None) -> Adapter:
        """Validate and load an adapter without attaching it. Loading the same name twice is a no-op.

        Every adapter passes the same admission (safety/admission.py): the config's signature policy, the
        ``sha256`` pin when given, the base it was converted for (unless ``force``), then the
        structural checks; llama.cpp then reads the very file that was checked. ``config``: whose
        signature policy applies (default: the engine's ``config``)."""
        path = Path(path)
        name = name or path.stem
        with self._gate.hold():
            have = self._resident.get(name)
            if have is not None:
                if have.path.resolve() != path.resolve():
                    raise AdapterError(f"adapter name {name!r} is already used by {have.path}")
                return have
            with admission.admitted(path, self.base, self.model_path, config or self.config,
                                    sha256=sha256, force=force) as (data, info):
                if self._adapters_may_go_to_a_device() and not self._gpu_adapters_checked:
                    # Adapter tensors go to the device; on some drivers the next decode kills the process.
                    gpu_adapters.check(self.model_path, self.n_gpu_layers, list(self.offload.devices), path,
                                       extra_buffers=self.cpu_path.extra_buffers)
                    self._gpu_adapters_checked = True
                handle = self.llama.adapter_init(data)
            if not handle:
                raise AdapterError(f"{path}: llama.cpp refused the adapter ({native_log.recent(1) or 'run with -v for its log'})")
            adapter = Adapter(name, path, info, handle, sha256=sha256)
            self._resident[name] = adapter
            return adapter

    def attach(self, path: str | os.PathLike, name: str | None = None, scale: float = 1.0, *, force: bool = False) -> str:
        """Load (if needed) and activate an adapter alongside the others. Returns its name."""
        _check_scale(scale)
        with self._gate.hold():
            adapter = self.load(path, name, force=force)
            self._active[adapter.name] = float(scale)
            self._apply()
            return adapter.name

    def activate(self, name: str, scale: float = 1.0) -> None:
        """Attach an already resident adapter by name (reads no file)."""
        _check_scale(scale)
        with self._gate.hold():
            self._require(name)
            self._active[name] = float(scale)
            self._apply()

    def set_adapters(self, scales: dict[str, float]) -> None:
        """Replace the whole active set at once with resident adapters (one switch, one KV decision)."""
        for s in scales.values():
            _check_scale(s)
        with self._gate.hold():
            for name in scales:
                self._require(name)
            self._active = {n: float(s) for n, s in scales.items()}
            self._apply()

    def set_scale(self, name: str, scale: float) -> None:
        _check_scale(scale)
        with self._gate.hold():
            if name not in self._active:
                raise UnknownAdapterError(f"adapter {name!r} is not attached (attached: {slots.names(self._active)})")
            self._active[name] = float(scale)
            self._apply()

    def detach(self, name: str, *, free: bool = False) -> None:
        """Deactivate an adapter; it stays resident (re-attaching reads no file) unless ``free``."""
        with self._gate.hold():
            if name not in self._active and name not in self._resident:
                raise UnknownAdapterError(f"adapter {name!r} is not attached (attached: {slots.names(self._active)})")
            self._active.pop(name, None)
            self._apply()
            if free:
                self.free(name)

    def detach_all(self) -> None:
        with self._gate.hold():
            self._active.clear()
            self._apply()

    def free(self, name: str) -> None:
        """Release a resident adapter's memory. It is detached first (llama.cpp requires that)."""
        with self._gate.hold():
            adapter = self._require(name)
            self._active.pop(name, None)
            del self._resident[name]
            self.kv_states.drop_serial(adapter.serial)
            self._retired.append(adapter)
            self._free_retired()

    def _free_retired(self) -> None:
        """Free the adapters let go whose sequences have ended (a running answer keeps its adapters)."""
        for adapter in [a for a in self._retired if not self.scheduler.in_use(a.handle)]:
            self.scheduler.forget_adapters()  # llama.cpp frees only adapters no context has set
            self.llama.adapter_free(adapter.handle)
            self._retired.remove(adapter)

    def _require(self, name: str) -> Adapter:
        return slots.require(self._resident, name)

    def _apply(self) -> None:
        """The active set changed. Nothing goes to llama.cpp now: each generation takes the set active
        when it starts, and the scheduler sets it for that sequence's decodes."""

    def _request(self, tokens: list[int], max_tokens: int = 1, sampling: SamplerSettings = SamplerSettings()) -> SeqRequest:
        """The active set, as a request carries it: handles and scales, and the key its KV is filed by."""
        adapters = tuple((self._resident[n].handle, s) for n, s in self._active.items())
        return SeqRequest(tokens, adapters, slots.set_key(self._resident, self._active), max_tokens, sampling,
                          reuse_prefix=self.reuse_prefix)

    def adapter_report(self) -> list[dict]:
        return slots.report(self._resident, self._active)

    # ------------------------------------------------------------------ generation

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def render_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """Prompt tokens and stop strings from the model's own chat template.

        Only the template's own markers become control tokens: message contents are tokenized as
        plain text, so a user typing ``<|im_end|><|im_start|>system`` gets those characters, not a
        new system turn."""
        return self._template.render_chat(messages)

    def complete(self, prompt: str, **sampling) -> Completion:
        return _drain(self.stream_complete(prompt, **sampling))

    def chat(self, messages: Sequence[dict], **sampling) -> Completion:
        return _drain(self.stream_chat(messages, **sampling))

    def stream_complete(self, prompt: str, **sampling) -> Stream:
        return self._stream(self.tokenize(prompt), [], sampling)

    def stream_chat(self, messages: Sequence[dict], **sampling) -> Stream:
        tokens, stop = self.render_chat(messages)
        return self._stream(tokens, stop, sampling)

    def new_conversation(self) -> None:
        """Forget KV states saved for the previous conversation (they would never match again)."""
        with self._gate.hold():
            self.kv_states.clear()

    def cancel(self) -> None:
        """Stop every generation in progress (from another thread); each ends with finish_reason 'cancelled'."""
        self.scheduler.cancel_all()

    def _stream(self, tokens: list[int], template_stop: list[str], sampling: dict) -> Stream:
        opts = _sampling_options(sampling)
        stop = [s for s in template_stop + opts.pop("stop") if s]
        n_ctx = self.llama.n_ctx()
        if len(tokens) >= n_ctx:
            raise ContextLengthError(f"the prompt has {len(tokens)} tokens; the context holds {n_ctx} (raise --ctx)")
        max_tokens = opts.pop("max_tokens")
        if max_tokens <= 0 or len(tokens) + max_tokens > n_ctx:
            max_tokens = n_ctx - len(tokens)
        seed = opts.pop("seed")
        return Stream(lambda stream: self._generate(stream, tokens, stop, max_tokens, seed, opts))

    def _generate(self, stream: Stream, tokens, stop, max_tokens, seed, opts) -> Iterator[str]:
        """One generation: a sequence of the scheduler under the adapter set active now, read as text
        (generate.py's token loop). The engine is held only while the request is made: a switch
        afterwards changes the next generation's set, never this one's (its sequence keeps its own)."""
        sampling = SamplerSettings(temp=opts["temp"], top_k=opts["top_k"], top_p=opts["top_p"], min_p=opts["min_p"],
                                   repeat_penalty=opts["repeat_penalty"], seed=seed)
        with self._gate.hold():
            seq = self.scheduler.submit(self._request(tokens, max_tokens, sampling))
            report = self.adapter_report()
        loop = TokenLoop(self.llama, stop, max_tokens, seq)
        try:
            yield STARTED
            yield from loop.run(self.scheduler.tokens(seq))
        except BaseException:
            loop.finish = "cancelled"
            raise
        finally:
            self.scheduler.release(seq)
            stream.completion = self.last = loop.completion(len(tokens), report, seq.cached)
            self._free_retired()

    @contextmanager
    def session(self, timeout: float | None = None):
        """Hold the engine across several calls from this thread, e.g. switch adapters then stream
        with no other thread switching in between. Other threads wait; ``timeout`` bounds our wait."""
        with self._gate.hold(timeout):
            yield self

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Last-position logits for ``tokens`` under the active adapters (a fresh evaluation)."""
        with self._gate.hold():
            request = self._request(list(tokens))
            return self.scheduler.logits(request.tokens, request.adapters, request.key)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free adapters, then the model (adapters must go first: the model owns their list)."""
        llama = getattr(self, "llama", None)
        if llama is None:
            return
        with self._gate.hold():
            self.kv_states.clear()
            self._active.clear()
            adapters = [*self._resident.values(), *self._retired]
            if adapters:
                if llama.ctx is not None:
                    self.scheduler.cancel_all()
                    self.scheduler.forget_adapters()
                if llama.model_alive:  # a freed model took its adapters with it
                    for adapter in adapters:
                        llama.adapter_free(adapter.handle)
                self._resident.clear()
                self._retired.clear()
            llama.close()
            self.llama = None  # type: ignore[assignment]

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _drain(stream: Stream) -> Completion:
    for _ in stream:
        pass
    return stream.completion  # type: ignore[return-value]
