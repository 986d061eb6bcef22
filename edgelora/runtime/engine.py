"""The llama.cpp backend: one base model, LoRA adapters switched at runtime, KV-safe generation.

The base is loaded once through llama-cpp-python's ``Llama`` (memory-mapped). Adapters go through
llama.cpp's own adapter API (``llama_adapter_lora_init`` / ``llama_set_adapters_lora`` /
``llama_adapter_lora_free``) so any number can be attached, re-weighted and detached without a
reload. Setting adapters does not touch the KV cache, and ``Llama.generate`` reuses the longest
matching token prefix, so the engine remembers which adapter set computed the cached tokens and
drops them whenever a generation runs under a different set.

This module knows nothing of roles, the CLI or the TUI.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import itertools
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import llama_cpp
import numpy as np

from edgelora.safety import cpu
from edgelora.safety import gpu_adapters
from edgelora.runtime import native_log
from edgelora.runtime import offload
from edgelora.safety import admission
from edgelora.config import load_config
from edgelora.runtime.backend import backend_info
from edgelora.errors import AdapterError, EdgeloraError, ModelError, UnknownAdapterError
from edgelora.runtime.gate import Gate
from edgelora.models.gguf_info import GGUFInfo, read_gguf, validate_adapter, validate_base_model
from edgelora.models.catalog import known_chat_template, resolve_model

# Sampling options accepted by complete/chat/stream_* and their defaults (llama.cpp's usual ones).
SAMPLING_DEFAULTS = {
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "seed": 0,
    "max_tokens": 256,
    "stop": None,
}


_SERIALS = itertools.count(1)
DEFAULT_CTX = 2048


@dataclass
class KVState:
    """The KV cells of sequence 0 and the tokens they hold, saved under one adapter set."""

    tokens: np.ndarray
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.tokens.nbytes


class KVStateCache:
    """Saved KV states per adapter set, least recently used dropped first, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._states: OrderedDict[tuple, KVState] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    def put(self, key: tuple, state: KVState) -> None:
        self._states.pop(key, None)
        if state.nbytes > self.budget:
            return
        self._states[key] = state
        while self.nbytes > self.budget:
            self._states.popitem(last=False)

    def take(self, key: tuple) -> KVState | None:
        return self._states.pop(key, None)

    def drop_serial(self, serial: int) -> None:
        for key in [k for k in self._states if any(item[1] == serial for item in k)]:
            del self._states[key]

    def clear(self) -> None:
        self._states.clear()


@dataclass
class Adapter:
    """A resident adapter: loaded into llama.cpp, attached or not."""

    name: str
    path: Path
    info: GGUFInfo
    handle: object  # llama_adapter_lora pointer
    serial: int = field(default_factory=lambda: next(_SERIALS))  # identity for KV keys (addresses get reused)
    sha256: str | None = None  # the pin it was loaded under: a file rewritten in place is another version

    @property
    def size(self) -> int:
        return self.info.size


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapters: list[dict] = field(default_factory=list)
    ttft_s: float = 0.0
    total_s: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (same adapter set), not re-evaluated

    @property
    def tokens_per_s(self) -> float:
        gen_s = self.total_s - self.ttft_s
        # The first token's time is prefill; the rate counts the tokens after it.
        if self.completion_tokens > 1 and gen_s > 0:
            return (self.completion_tokens - 1) / gen_s
        return 0.0

    @property
    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cached_tokens": self.cached_tokens,
        }


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
    ):
        """``n_threads`` None: edgelora's default (cpu.default_threads). ``cpu_extra_buffers``: 'auto'
        (probe this host once, in a child process), 'on' or 'off'; None reads the config/environment.
        ``reuse_prefix`` False evaluates every prompt from scratch: greedy answers then repeat exactly
        (llama.cpp's CPU kernels round differently for different batch sizes, so a prompt evaluated
        partly from cache can flip a near-tie; README 'Reproducibility')."""
        native_log.set_verbose(verbose)
        self.model_path = resolve_model(model)
        self._base: GGUFInfo | None = None
        try:
            self.base
        except AdapterError as exc:  # not a GGUF at all: a model error here, not an adapter's
            raise ModelError(str(exc)) from None
        if self.base.metadata.get("general.type") == "adapter":
            raise ModelError(f"{self.model_path} is a LoRA adapter, not a base model; pass it with --adapter")
        validate_base_model(self.base)  # what llama.cpp asserts on would kill the process
        n_threads = cpu.check_threads(n_threads)
        n_ctx = self._check_ctx(n_ctx)
        gpu_adapters.setting()  # a bad EDGELORA_GPU_ADAPTERS is an error on every build, not only with a GPU
        # Decided before loading, outside this process when unknown: a crash here would kill the user's.
        self.cpu_path = cpu.decide(self.model_path, cpu_extra_buffers, self.base.metadata.get("general.file_type"))
        self.n_threads = n_threads
        self.reuse_prefix = reuse_prefix
        self.n_gpu_layers = n_gpu_layers
        self._gate = Gate()  # one holder at a time; see gate.py and README 'Threads'
        self._cancel = threading.Event()
        self._interrupted = False
        self._abort_cb = llama_cpp.ggml_abort_callback(self._should_abort)  # kept alive with the engine
        self._resident: dict[str, Adapter] = {}
        self._active: dict[str, float] = {}  # name -> scale, in attach order
        self._kv_key: tuple = ()  # the adapter set that computed the tokens now in the KV cache
        # KV states of the current conversation under other adapter sets: switching back to one
        # evaluates only the new tokens. 0 disables.
        self.kv_states = KVStateCache(kv_cache_bytes)
        self.last: Completion | None = None
        t0 = time.perf_counter()
        try:
            with cpu.extra_buffers(self.cpu_path.extra_buffers), native_log.capture() as load_log:
                self.llama = llama_cpp.Llama(
                    model_path=str(self.model_path),
                    n_gpu_layers=n_gpu_layers,
                    # A GPU build otherwise ships big CPU-side batches to the device: 0 layers means CPU.
                    op_offload=n_gpu_layers != 0,
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    n_batch=n_batch,
                    seed=seed,
                    use_mmap=True,
                    verbose=verbose,
                )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(_why_not_a_model(self.model_path, exc)) from None
        except jinja2.TemplateError as exc:  # llama-cpp-python compiles the model's chat templates at load
            raise ModelError(f"{self.model_path}: its chat template does not compile ({exc})") from None
        self.load_s = time.perf_counter() - t0
        self._gpu_adapters_checked = False
        self.offload = offload.parse(load_log)  # what llama.cpp did with n_gpu_layers, from its own log
        self._formatter = self._chat_formatter()

    def _check_ctx(self, n_ctx: int | None) -> int:
        """The context size: ``n_ctx``, or by default 2048 tokens (less if the model was trained for less)."""
        trained = self.base.metadata.get(f"{self.base.architecture}.context_length")
        limit = int(trained) if isinstance(trained, int) and 0 < trained < (1 << 24) else 1 << 17
        if n_ctx is None:
            return min(DEFAULT_CTX, limit)
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 16 <= n_ctx <= limit:
            raise EdgeloraError(f"--ctx {n_ctx}: must be 16 to {limit} (the context {self.model_path.name} was trained for)")
        return n_ctx

    @property
    def base(self) -> GGUFInfo:
        """The base's metadata and tensor shapes (read on first use: only adapter checks need them)."""
        if self._base is None:
            self._base = read_gguf(self.model_path)
        return self._base

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

        Every adapter passes the same admission (admission.py): the config's signature policy, the
        ``sha256`` pin when given, the base it was converted for (unless ``force``), then the
        structural checks; llama.cpp then reads the very file that was checked. ``config``: whose
        signature policy applies (default: the user's config file)."""
        path = Path(path)
        name = name or path.stem
        with self._gate.hold():
            have = self._resident.get(name)
            if have is not None:
                if have.path.resolve() != path.resolve():
                    raise AdapterError(f"adapter name {name!r} is already used by {have.path}")
                return have
            with admission.pinned(path) as data:
                if sha256 is not None:
                    admission.check_sha256(data, path, sha256)
                admission.check_signature(data, path, config or load_config())  # TODO(lead): Engine.config after the split
                try:
                    info = validate_adapter(data, self.base)
                except AdapterError as exc:  # name the user's file, not /proc/self/fd/N
                    raise type(exc)(str(exc).replace(str(data), str(path))) from None
                info.path = path
                if not force:
                    admission.check_base(info, self.model_path, path)
                if self._adapters_may_go_to_a_device() and not self._gpu_adapters_checked:
                    # Adapter tensors go to the device; on some drivers the next decode kills the process.
                    gpu_adapters.check(self.model_path, self.n_gpu_layers, list(self.offload.devices), path)
                    self._gpu_adapters_checked = True
                handle = llama_cpp.llama_adapter_lora_init(self.llama._model.model, str(data).encode())
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
                raise UnknownAdapterError(f"adapter {name!r} is not attached (attached: {_names(self._active)})")
            self._active[name] = float(scale)
            self._apply()

    def detach(self, name: str, *, free: bool = False) -> None:
        """Deactivate an adapter; it stays resident (re-attaching reads no file) unless ``free``."""
        with self._gate.hold():
            if name not in self._active and name not in self._resident:
                raise UnknownAdapterError(f"adapter {name!r} is not attached (attached: {_names(self._active)})")
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
            if name in self._active:
                self._active.pop(name)
                self._apply()
            llama_cpp.llama_adapter_lora_free(adapter.handle)
            del self._resident[name]
            self.kv_states.drop_serial(adapter.serial)

    def _require(self, name: str) -> Adapter:
        try:
            return self._resident[name]
        except KeyError:
            raise UnknownAdapterError(
                f"adapter {name!r} is not loaded (loaded: {_names(self._resident)})"
            ) from None

    def _set_key(self) -> tuple:
        return tuple((name, self._resident[name].serial, s) for name, s in self._active.items())

    def _apply(self) -> None:
        """Push the active set to llama.cpp. KV invalidation happens lazily in ``_prepare``."""
        items = [(self._resident[n].handle, s) for n, s in self._active.items()]
        n = len(items)
        if n:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*[h for h, _ in items])
            scales = (ctypes.c_float * n)(*[s for _, s in items])
        else:
            handles, scales = None, None
        if llama_cpp.llama_set_adapters_lora(self.llama._ctx.ctx, handles, n, scales) != 0:
            raise AdapterError(f"llama.cpp could not set adapters {_names(self._active)}")

    def _prepare(self) -> None:
        """Before any decode: forget KV entries computed under a different adapter set."""
        key = self._set_key()
        if key == self._kv_key:
            return
        if self.kv_states.budget and self.llama.n_tokens:
            self.kv_states.put(self._kv_key, self._save_kv())
        self._clear_kv()
        saved = self.kv_states.take(key)
        if saved is not None:
            self._load_kv(saved)
        self._kv_key = key

    def _clear_kv(self) -> None:
        self.llama.reset()
        mem = llama_cpp.llama_get_memory(self.llama._ctx.ctx)
        if mem is not None:
            llama_cpp.llama_memory_clear(mem, True)

    def _save_kv(self) -> KVState:
        ctx = self.llama._ctx.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
        return KVState(tokens=self.llama.input_ids[: self.llama.n_tokens].copy(), data=bytes(buf)[:n])

    def _load_kv(self, state: KVState) -> None:
        buf = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if llama_cpp.llama_state_seq_set_data(self.llama._ctx.ctx, buf, len(state.data), 0) != len(state.data):
            self._clear_kv()  # a state that does not fit: evaluate from scratch instead
            return
        n = len(state.tokens)
        self.llama.input_ids[:n] = state.tokens
        self.llama.n_tokens = n
        self.llama._requires_eval = True  # logits are not restored: generate() re-decodes the last token

    def adapter_report(self) -> list[dict]:
        return [
            {"name": n, "path": str(self._resident[n].path), "scale": s} for n, s in self._active.items()
        ]

    # ------------------------------------------------------------------ generation

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def render_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[str]]:
        """Prompt tokens and stop strings from the model's own chat template.

        Only the template's own markers become control tokens: message contents are tokenized as
        plain text, so a user typing ``<|im_end|><|im_start|>system`` gets those characters, not a
        new system turn."""
        if self._formatter is None:
            raise ModelError(f"{self.model_path.name} has no chat template (none in the GGUF, none in the model "
                             "catalog), so it cannot chat; use an instruct model, or plain completion")
        messages = list(messages)
        result = self._render(messages)
        pieces = _split_contents(result.prompt, self._render(_placeholders(messages)).prompt, messages)
        tokens = [self.llama.token_bos()] if not result.added_special and self.llama.token_bos() >= 0 else []
        # Like llama.cpp's own special=True tokenization (cut at control-token texts, tokenize each
        # run between them as text), except that cuts are made only in the template's own text.
        run = ""
        for piece, is_content in pieces:
            if is_content:
                run += piece
                continue
            for part in self._control_re.split(piece):
                if part in self._control:
                    tokens += self._text_tokens(run) + [self._control[part]]
                    run = ""
                else:
                    run += part
        tokens += self._text_tokens(run)
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, [s for s in stop if s]

    def _text_tokens(self, text: str) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    @functools.cached_property
    def _control(self) -> dict[str, int]:
        """Control tokens (<|im_start|>, <start_of_turn>...) by their text."""
        model = self.llama._model
        return {model.token_get_text(i): i for i in range(self.llama.n_vocab())
                if model.token_get_attr(i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL and model.token_get_text(i)}

    @functools.cached_property
    def _control_re(self) -> re.Pattern:
        names = sorted(self._control, key=len, reverse=True)  # longest first, as llama.cpp matches
        return re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else re.compile("(?!)")

    @functools.cached_property
    def _prompt_chars_limit(self) -> int:
        """No prompt longer than this fits the context: no token stands for more characters than its text."""
        model = self.llama._model
        longest = max((len(model.token_get_text(i)) for i in range(self.llama.n_vocab())), default=1)
        return self.llama.n_ctx() * max(longest, 1)

    def _render(self, messages: list[dict]):
        limit = self._prompt_chars_limit
        if sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)) > limit:
            raise EdgeloraError(f"the messages are over {limit} characters; the context holds {self.llama.n_ctx()} "
                                "tokens (raise --ctx)")
        try:
            return _within(TEMPLATE_BUDGET_S, lambda: self._formatter(messages=messages))
        except TimeoutError:
            raise ModelError(f"{self.model_path.name}: its chat template ran over {TEMPLATE_BUDGET_S:g} s "
                             "(a runaway loop?); use complete() or fix the template") from None
        except _PromptTooLong:
            raise ModelError(f"{self.model_path.name}: its chat template wrote over {limit} characters, more than "
                             f"the {self.llama.n_ctx()}-token context can hold (a runaway loop?); use complete() or "
                             "fix the template") from None
        except Exception as exc:  # the template may raise_exception() on bad roles/order
            raise EdgeloraError(f"chat template error: {exc}") from None

    def complete(self, prompt: str, **sampling) -> Completion:
        for _ in self.stream_complete(prompt, **sampling):
            pass
        return self.last  # type: ignore[return-value]

    def chat(self, messages: Sequence[dict], **sampling) -> Completion:
        for _ in self.stream_chat(messages, **sampling):
            pass
        return self.last  # type: ignore[return-value]

    def stream_complete(self, prompt: str, **sampling) -> Iterator[str]:
        return self._stream(self.tokenize(prompt), [], sampling)

    def stream_chat(self, messages: Sequence[dict], **sampling) -> Iterator[str]:
        tokens, stop = self.render_chat(messages)
        return self._stream(tokens, stop, sampling)

    def new_conversation(self) -> None:
        """Forget KV states saved for the previous conversation (they would never match again)."""
        with self._gate.hold():
            self.kv_states.clear()

    def cancel(self) -> None:
        """Stop the generation in progress (from another thread); it ends with finish_reason 'cancelled'."""
        self._cancel.set()

    def _stream(self, tokens: list[int], template_stop: list[str], sampling: dict) -> Iterator[str]:
        opts = _sampling_options(sampling)
        stop = [s for s in template_stop + opts.pop("stop") if s]
        n_ctx = self.llama.n_ctx()
        if len(tokens) >= n_ctx:
            raise EdgeloraError(f"the prompt has {len(tokens)} tokens; the context holds {n_ctx} (raise --ctx)")
        max_tokens = opts.pop("max_tokens")
        if max_tokens <= 0 or len(tokens) + max_tokens > n_ctx:
            max_tokens = n_ctx - len(tokens)
        seed = opts.pop("seed")
        return self._generate(tokens, stop, max_tokens, seed, opts)

    def _generate(self, tokens, stop, max_tokens, seed, opts) -> Iterator[str]:
        """Token loop over ``Llama.generate``: exact token counts, stop strings, cancellation.

        The stream holds the engine from its first step until it ends or is closed (from any
        thread): the adapter set cannot change under it (see gate.py)."""
        self._gate.acquire(stream=True)
        try:
            self._cancel.clear()
            self._interrupted = False
            self._prepare()
            if not self.reuse_prefix:
                self._clear_kv()
            cached = self._reusable_prefix(tokens)
            self.llama.set_seed(seed)
            report = self.adapter_report()
            vocab = self.llama._model.vocab
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            hold = max((len(s) for s in stop), default=1) - 1  # chars that might start a stop string
            text, emitted, n_out, finish = "", 0, 0, "length"
            t0 = time.perf_counter()
            ttft = 0.0
            self._watch_prefill(True)  # cancel() and Ctrl+C also stop a long prompt evaluation
            try:
                for token in self.llama.generate(tokens, **opts):
                    if n_out == 0:
                        ttft = time.perf_counter() - t0
                        self._watch_prefill(False)  # between tokens the loop checks for itself
                    if llama_cpp.llama_vocab_is_eog(vocab, token):
                        finish = "stop"
                        break
                    n_out += 1
                    text += decoder.decode(self.llama.detokenize([token]))
                    cut = _find_stop(text, stop)
                    if cut is not None:
                        text, finish = text[:cut], "stop"
                        break
                    safe = len(text) - hold
                    if safe > emitted:
                        yield text[emitted:safe]
                        emitted = safe
                    if n_out >= max_tokens:
                        break
                    if self._cancel.is_set():
                        finish = "cancelled"
                        break
                if len(text) > emitted:
                    yield text[emitted:]
            except RuntimeError as exc:
                if "returned 2" not in str(exc):  # 2: aborted by our callback; anything else is a real failure
                    raise
                if not self._cancel.is_set():  # Ctrl+C hit the callback before it could note it
                    self._interrupted = True
                # llama_decode was aborted mid-batch: what it left in the KV cache is incomplete.
                finish = "cancelled"
                self._clear_kv()
            finally:
                self._watch_prefill(False)
                self.last = Completion(
                    text=text,
                    finish_reason=finish,
                    prompt_tokens=len(tokens),
                    completion_tokens=n_out,
                    adapters=report,
                    ttft_s=ttft,
                    total_s=time.perf_counter() - t0,
                    cached_tokens=cached,
                )
        finally:
            self._gate.release(stream=True)
        if self._interrupted:  # Ctrl+C arrived inside llama.cpp: the callback stopped it; pass it on
            raise KeyboardInterrupt

    def _watch_prefill(self, on: bool) -> None:
        """llama.cpp calls the abort callback between graph nodes: on only while the prompt is evaluated,
        so the Python round trip costs nothing per generated token."""
        ctx = self._native_ctx()
        if ctx is None:  # a stream closed after its engine (at exit, in whatever order the collector picks)
            return
        cb = self._abort_cb if on else llama_cpp.ggml_abort_callback()
        llama_cpp.llama_set_abort_callback(ctx, cb, None)

    def _native_ctx(self):
        """llama.cpp's context, or None once freed: by close(), or by the Llama's own finalizer, which
        the garbage collector may run before an open stream's cleanup or the engine's."""
        llama = getattr(self, "llama", None)
        return getattr(getattr(llama, "_ctx", None), "ctx", None)

    def _should_abort(self, _data) -> bool:
        try:
            return self._cancel.is_set()
        except KeyboardInterrupt:  # the signal handler ran inside the callback
            self._interrupted = True
            self._cancel.set()
            return True

    @contextmanager
    def session(self, timeout: float | None = None):
        """Hold the engine across several calls from this thread, e.g. switch adapters then stream
        with no other thread switching in between. Other threads wait; ``timeout`` bounds our wait."""
        with self._gate.hold(timeout):
            yield self

    def _reusable_prefix(self, tokens: list[int]) -> int:
        """How many prompt tokens Llama.generate will take from the KV cache (its own rule)."""
        n = min(self.llama.n_tokens, len(tokens))
        if n == 0:
            return 0
        diff = np.flatnonzero(self.llama.input_ids[:n] != np.asarray(tokens[:n]))
        common = int(diff[0]) if diff.size else n
        return common - 1 if common == len(tokens) else common

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Last-position logits for ``tokens`` under the active adapters (a fresh evaluation)."""
        with self._gate.hold():
            self._prepare()
            self.llama.reset()
            self.llama.eval(list(tokens))
            ptr = llama_cpp.llama_get_logits_ith(self.llama._ctx.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(self.llama.n_vocab(),)).copy()

    # ------------------------------------------------------------------ lifecycle

    def _chat_formatter(self, template: str | None = None):
        """The model's chat template (or ``template``; else the catalog's for a GGUF that lacks one),
        its output bounded by what the context holds."""
        template = template or self.llama.metadata.get("tokenizer.chat_template") or known_chat_template(self.model_path)
        if not template:
            return None
        model = self.llama._model
        eos_id, bos_id = model.token_eos(), model.token_bos()
        formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        formatter._environment = _BoundedTemplate(formatter._environment, lambda: self._prompt_chars_limit)
        return formatter

    def close(self) -> None:
        """Free adapters, then the model (adapters must go first: the model owns their list)."""
        llama = getattr(self, "llama", None)
        if llama is None:
            return
        with self._gate.hold():
            self.kv_states.clear()
            self._active.clear()
            if self._resident:
                if self._native_ctx() is not None:
                    self._apply()
                if getattr(llama._model, "model", None) is not None:  # a freed model took its adapters with it
                    for adapter in self._resident.values():
                        llama_cpp.llama_adapter_lora_free(adapter.handle)
                self._resident.clear()
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


MAX_SCALE = 4.0  # llama.cpp takes any float; past a few times the trained strength the output is garbage


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -MAX_SCALE <= scale <= MAX_SCALE:
        raise EdgeloraError(f"adapter scale must be a number from {-MAX_SCALE:g} to {MAX_SCALE:g} "
                            f"(negative subtracts the adapter), got {scale!r}")


def _names(d: dict) -> str:
    return ", ".join(d) or "none"


TEMPLATE_BUDGET_S = 2.0  # a chat template is code from the model file: bound what it may cost


def _within(seconds: float, fn):
    """Run fn, raising TimeoutError once it has run ``seconds`` (checked on every Python line it runs:
    Jinja templates compile to Python, so a runaway template loop is stopped)."""
    deadline = time.perf_counter() + seconds
    previous = sys.gettrace()

    def tracer(frame, event, arg):
        if time.perf_counter() > deadline:
            raise TimeoutError
        return tracer

    sys.settrace(tracer)
    try:
        return fn()
    finally:
        sys.settrace(previous)


class _PromptTooLong(Exception):
    pass


class _BoundedTemplate:
    """A compiled chat template whose output stops once it passes ``limit()`` characters: a
    template's loop can write far more than any context holds (and fill memory) within its time bound."""

    def __init__(self, template, limit):
        self.template, self.limit = template, limit

    def render(self, *args, **kwargs) -> str:
        limit, size, pieces = self.limit(), 0, []
        for piece in self.template.generate(*args, **kwargs):
            size += len(piece)
            if size > limit:
                raise _PromptTooLong
            pieces.append(piece)
        return "".join(pieces)


_MARK = "\x00edgelora-content-{}\x00"
_MARK_RE = re.compile("(\x00edgelora-content-\\d+\x00)")


def _placeholders(messages: list[dict]) -> list[dict]:
    """The same messages with each string content replaced by a marker the template passes through."""
    return [{**m, "content": _MARK.format(i)} if isinstance(m.get("content"), str) else m for i, m in enumerate(messages)]


def _split_contents(prompt: str, marked: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """Cut the rendered prompt into (text, is_message_content) pieces.

    ``marked`` is the template rendered with markers for contents; matching it against the real
    prompt finds each content as the template rendered it (a template may trim it)."""
    parts = _MARK_RE.split(marked)  # odd indices are markers
    pattern = "".join("(.*?)" if i % 2 else re.escape(p) for i, p in enumerate(parts))
    m = re.fullmatch(pattern, prompt, re.S)
    if m is None:  # the template changed the text around contents: put the raw contents in the markers
        return [(messages[int(p.strip("\x00").rsplit("-", 1)[1])]["content"] if i % 2 else p, bool(i % 2))
                for i, p in enumerate(parts)]
    return [(m.group(i // 2 + 1) if i % 2 else p, bool(i % 2)) for i, p in enumerate(parts)]


def _find_stop(text: str, stop: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


_BOUNDS = {  # (low, high, integer): outside these llama.cpp overflows, or the answer is noise
    "temperature": (0, 100, False), "top_p": (0, 1, False), "top_k": (0, 1 << 20, True), "min_p": (0, 1, False),
    "repeat_penalty": (0, 100, False), "seed": (-1, 2**32 - 1, True), "max_tokens": (-1, 1 << 24, True),
}


def _sampling_options(sampling: dict) -> dict:
    """Our sampling names -> Llama.generate's, with edgelora's defaults, each checked."""
    unknown = set(sampling) - SAMPLING_DEFAULTS.keys()
    if unknown:
        raise EdgeloraError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
    opts = {**SAMPLING_DEFAULTS, **{k: v for k, v in sampling.items() if v is not None}}
    for key, (lo, hi, integer) in _BOUNDS.items():
        value = opts[key]
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok or not (lo <= value <= hi):  # NaN fails the comparison too
            kind, span = ("an integer", f"{lo} to {hi}") if integer else ("a number", f"{lo:g} to {hi:g}")
            raise EdgeloraError(f"{key.replace('_', '-')} must be {kind} from {span}, got {value!r}")
    stop = opts.pop("stop")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(x, str) for x in stop):
        raise EdgeloraError(f"stop must be strings, got {stop!r}")
    opts["stop"] = stop
    opts["temp"] = float(opts.pop("temperature"))
    opts["max_tokens"] = int(opts["max_tokens"])
    opts["seed"] = int(opts["seed"])
    return opts
