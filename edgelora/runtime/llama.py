"""The one module that talks to llama-cpp-python: a thin handle over one model and its context.

Everything else in edgelora goes through here, so a llama-cpp-python release that renames an
internal breaks this file only (tests/runtime/test_llama_handle_is_the_only_llama_cpp_user.py keeps
it so). In the spirit of llama-cpp-python's own ``_internals.py``: loading and ``generate`` (prefix
reuse, its sampler) stay llama-cpp-python's ``Llama``; what it has no public call for (the KV state
of one sequence, the adapter API, the abort callback, the extra buffer types at load, the chat
template's environment) is done here, once.

A ``Context`` holds ``n_seq`` sequences (llama.cpp's seq_id 0..n_seq-1), each with its own ``n_ctx``
cells, and one active adapter set; the scheduler (scheduler.py) decodes them together through
``TokenBatch``, ``Context.decode`` and ``Sampler``. The handle's first context is Llama's own
(``main``); ``new_context`` makes more on the same weights (one per adapter set running at once:
switching a context's set costs llama.cpp a re-reserve, switching contexts costs nothing).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp._internals
import llama_cpp.llama_chat_format
import numpy as np

ABORTED = "returned 2"  # llama_decode's status when the abort callback stopped it, as Llama words the error


# ------------------------------------------------------------------ the build (no model needed)

def package_file() -> str:
    """The llama_cpp package's own file: part of every probe verdict's key (another install is another build)."""
    return llama_cpp.__file__


def library_dir() -> Path:
    """Where libllama and ggml's libraries ship."""
    return Path(llama_cpp.__file__).parent / "lib"


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


_log_callbacks: list = []  # ctypes callbacks must outlive every call llama.cpp makes to them


def set_log_callback(fn: Callable[[int, bytes, object], None]) -> None:
    """Route llama.cpp's and ggml's log lines, process-wide, to ``fn(level, text, user_data)``."""
    cb = llama_cpp.llama_log_callback(fn)
    _log_callbacks.append(cb)
    llama_cpp.llama_log_set(cb, None)


def baseline_llama(model_path: str, lora_path: str | None = None, n_ctx: int = 2048):
    """llama-cpp-python's own ``Llama`` as a user of it would make one: bench's baseline to beat."""
    return llama_cpp.Llama(model_path, lora_path=lora_path, n_ctx=n_ctx, verbose=False)


def is_abort(exc: BaseException) -> bool:
    """Did this error come from llama_decode stopped by the abort callback (not a real failure)?"""
    return isinstance(exc, RuntimeError) and ABORTED in str(exc)


_params_lock = threading.Lock()


@contextlib.contextmanager
def _defaults(function: str, **fields):
    """Make the llama.cpp defaults function ``function`` (llama_model_default_params,
    llama_context_default_params) return ``fields`` set, for one ``Llama(...)`` construction:
    Llama has no keyword for them and starts from those defaults."""
    module = llama_cpp.llama_cpp
    original = getattr(module, function)

    def params():
        p = original()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    setattr(module, function, params)
    try:
        yield
    finally:
        setattr(module, function, original)


@dataclass
class SeqState:
    """What one sequence holds: its tokens and llama.cpp's serialized KV cells for them."""

    tokens: np.ndarray
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.tokens.nbytes


class LlamaHandle:
    """One loaded model and its context. Public llama-cpp-python facts (``metadata``, ``n_ctx()``,
    ``tokenize``...) are passed through under their own names; the rest is one method per job."""

    def __init__(self, model_path: str | Path, *, n_gpu_layers: int = 0, n_ctx: int = 512, n_threads: int | None = None,
                 n_batch: int = 512, seed: int = 0, verbose: bool = False, extra_buffers: bool | None = None,
                 op_offload: bool | None = None, n_seq: int = 1, flash_attn: bool | None = None):
        """``extra_buffers``: llama.cpp's CPU extra buffer types (repacking, AMX) on or off; None: its default.
        ``op_offload`` defaults to ``n_gpu_layers != 0``: a GPU build otherwise ships big CPU-side batches
        to the device, and 0 layers means CPU. ``n_seq`` sequences of ``n_ctx`` tokens each.
        ``flash_attn`` defaults to on for CPU (llama.cpp's CPU kernel; measured 1.2-1.4x faster decoding
        here, and it is what llama-server's 'auto' picks) and off with layers on a device (as before:
        not every device backend has it)."""
        kwargs = dict(model_path=str(model_path), n_gpu_layers=n_gpu_layers,
                      op_offload=n_gpu_layers != 0 if op_offload is None else op_offload,
                      n_ctx=n_ctx * n_seq, flash_attn=n_gpu_layers == 0 if flash_attn is None else flash_attn, n_batch=n_batch, seed=seed, use_mmap=True, verbose=verbose)
        if n_threads is not None:
            kwargs.update(n_threads=n_threads, n_threads_batch=n_threads)
        self.n_seq = n_seq
        # n_seq sequences, each its own KV stream (kv_unified off: llama-server's -np layout; measured
        # faster here at 8 sequences than one shared stream); the CPU extra buffer types (repack, AMX)
        model = {} if extra_buffers is None else {"use_extra_bufts": extra_buffers}
        with _params_lock, _defaults("llama_context_default_params", n_seq_max=n_seq, kv_unified=False), \
                _defaults("llama_model_default_params", **model):
            self._llama = llama_cpp.Llama(**kwargs)
        self.main = Context(self, self._llama._ctx)

    # -------------------------------------------------------------- facts

    @property
    def metadata(self) -> dict:
        return self._llama.metadata

    @property
    def model_params(self):
        """What llama.cpp was given to load the model (llama_model_params)."""
        return self._llama.model_params

    @property
    def context_params(self):
        return self._llama.context_params

    def n_ctx(self) -> int:
        """Tokens one sequence holds."""
        return llama_cpp.llama_n_ctx_seq(self.ctx) if self.ctx is not None else self._llama.n_ctx() // self.n_seq

    def n_batch(self) -> int:
        """The most tokens one decode takes."""
        return self._llama.n_batch

    def n_vocab(self) -> int:
        return self._llama.n_vocab()

    def token_bos(self) -> int:
        return self._llama.token_bos()

    def token_eos(self) -> int:
        return self._llama.token_eos()

    def token_text(self, token: int) -> str:
        """The token's text as the vocabulary spells it (``<|im_start|>``, ``▁brief``)."""
        return self._llama._model.token_get_text(token)

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT or any token the model marks so."""
        return bool(llama_cpp.llama_vocab_is_eog(self._llama._model.vocab, token))

    def control_tokens(self) -> dict[str, int]:
        """Control tokens (<|im_start|>, <start_of_turn>...) by their text."""
        model = self._llama._model
        return {model.token_get_text(i): i for i in range(self.n_vocab())
                if model.token_get_attr(i) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL and model.token_get_text(i)}

    def longest_token_chars(self) -> int:
        """The most characters any one token stands for."""
        model = self._llama._model
        return max((len(model.token_get_text(i)) for i in range(self.n_vocab())), default=1)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._llama.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return self._llama.detokenize(list(tokens), special=special)

    def chat_formatter(self, template: str, bound: Callable | None = None):
        """llama-cpp-python's sandboxed Jinja chat formatter for ``template`` with this model's BOS/EOS;
        ``bound(compiled_template)`` may wrap the compiled template (e.g. to cap its output)."""
        model = self._llama._model
        eos_id, bos_id = model.token_eos(), model.token_bos()
        formatter = llama_cpp.llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        if bound is not None:
            formatter._environment = bound(formatter._environment)
        return formatter

    # -------------------------------------------------------------- liveness

    @property
    def ctx(self):
        """llama.cpp's context, or None once freed: by close(), or by the Llama's own finalizer, which the
        garbage collector may run before an open stream's cleanup or the engine's."""
        return getattr(getattr(getattr(self, "_llama", None), "_ctx", None), "ctx", None)

    @property
    def model_alive(self) -> bool:
        """False once the model is freed (it took its adapters with it)."""
        return getattr(getattr(getattr(self, "_llama", None), "_model", None), "model", None) is not None

    def close(self) -> None:
        self._llama.close()

    # -------------------------------------------------------------- adapters

    def adapter_init(self, path: str | Path):
        """Load a LoRA adapter into the model: its pointer, or None (the reason is in llama.cpp's log)."""
        handle = llama_cpp.llama_adapter_lora_init(self._llama._model.model, str(path).encode())
        return handle or None

    def adapter_free(self, adapter) -> None:
        """Free an adapter; it must be detached from every context first."""
        llama_cpp.llama_adapter_lora_free(adapter)

    def set_adapters(self, adapters: Sequence[tuple[object, float]]) -> bool:
        """The adapter set of Llama's own context (``generate``/``eval``, the probes' path)."""
        return self.main.set_adapters(adapters)

    # -------------------------------------------------------------- contexts

    def new_context(self) -> Context:
        """Another llama.cpp context on this model, with the same parameters (n_seq sequences of n_ctx
        cells, threads): its own KV cells, adapter set and compute buffers; the weights are shared.
        Freed before the model (llama-cpp-python's LlamaContext registers itself with the model)."""
        owner = llama_cpp._internals.LlamaContext(model=self._llama._model, params=self._llama.context_params,
                                                  verbose=False)
        return Context(self, owner)

    # -------------------------------------------------------------- Llama's own path (probes, one-off runs)

    def clear(self) -> None:
        """Forget every cell and Llama's own token record (``generate``/``eval``, the probe children's path)."""
        self._llama.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def set_seed(self, seed: int) -> None:
        self._llama.set_seed(seed)

    def generate(self, tokens: Sequence[int], **sampling) -> Iterator[int]:
        """Tokens sampled after ``tokens``, reusing the longest cached prefix (Llama.generate)."""
        return self._llama.generate(tokens, **sampling)

    def eval(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` after the cached ones."""
        self._llama.eval(list(tokens))

    def sample(self, temp: float = 0.0) -> int:
        return self._llama.sample(temp=temp)

    def last_logits(self) -> np.ndarray:
        """The logits of the last decoded position (a copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab(),)).copy()


class Context:
    """One llama.cpp context on the handle's model: ``n_seq`` sequences of KV cells (seq_id 0..n_seq-1),
    one active adapter set, its own compute buffers and thread counts. The scheduler decodes through
    these; the handle's first one (``handle.main``) is Llama's own."""

    def __init__(self, handle: LlamaHandle, owner):
        self.handle = handle
        self._owner = owner  # llama-cpp-python's LlamaContext: frees the native context (before the model)
        self._abort_cb = None

    @property
    def ctx(self):
        """The native context, or None once freed (with the model, by close() or a finalizer)."""
        return getattr(self._owner, "ctx", None)

    def close(self) -> None:
        self._owner.close()

    def set_adapters(self, adapters: Sequence[tuple[object, float]]) -> bool:
        """Replace the context's whole active set with ``(adapter, scale)`` pairs ([] detaches all).
        KV cells are untouched: what they hold was computed under the old set."""
        n = len(adapters)
        if n:
            handles = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*[h for h, _ in adapters])
            scales = (ctypes.c_float * n)(*[s for _, s in adapters])
        else:
            handles, scales = None, None
        return llama_cpp.llama_set_adapters_lora(self.ctx, handles, n, scales) == 0

    # -------------------------------------------------------------- memory, per sequence

    def seq_rm(self, seq_id: int, p0: int = 0) -> bool:
        """Drop the sequence's cells from position ``p0`` on; False when llama.cpp cannot cut there
        (e.g. a sliding-window cache): then drop them all."""
        mem = llama_cpp.llama_get_memory(self.ctx)
        if llama_cpp.llama_memory_seq_rm(mem, seq_id, p0, -1):
            return True
        llama_cpp.llama_memory_seq_rm(mem, seq_id, -1, -1)
        return False

    def save_state(self, seq_id: int, tokens: Sequence[int]) -> SeqState:
        """The sequence's KV cells and ``tokens``, what they hold."""
        ctx = self.ctx
        size = llama_cpp.llama_state_seq_get_size(ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(ctx, buf, size, seq_id)
        return SeqState(tokens=np.asarray(tokens, dtype=np.intc), data=bytes(buf)[:n])

    def load_state(self, state: SeqState, seq_id: int) -> bool:
        """Put a saved state (from any context on this model) into sequence ``seq_id``; False (and
        nothing kept) when llama.cpp does not take it."""
        buf = (ctypes.c_uint8 * len(state.data)).from_buffer_copy(state.data)
        if llama_cpp.llama_state_seq_set_data(self.ctx, buf, len(state.data), seq_id) != len(state.data):
            self.seq_rm(seq_id, -1)
            return False
        return True

    # -------------------------------------------------------------- evaluation

    def set_threads(self, n_gen: int, n_batch: int) -> None:
        """Threads for generation (one token) and for prompt batches, from the next decode on."""
        llama_cpp.llama_set_n_threads(self.ctx, n_gen, n_batch)

    def decode(self, batch: TokenBatch) -> int:
        """llama_decode: 0 done, 1 no room in the KV cache, 2 stopped by the abort callback, < 0 error."""
        return llama_cpp.llama_decode(self.ctx, batch.batch)

    def sampler(self, *, temp: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                seed: int) -> Sampler:
        return Sampler(self, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed)

    def logits_at(self, index: int) -> np.ndarray:
        """The logits the last decode kept at batch index ``index`` (a copy)."""
        return self.logits_view(index).copy()

    def logits_view(self, index: int) -> np.ndarray:
        """Those logits in llama.cpp's buffer, valid until the next decode (no copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.handle.n_vocab(),))

    def on_abort(self, should_abort: Callable[[object], bool]) -> None:
        """The function llama.cpp will ask, between graph nodes while ``watch_abort(True)``, whether to stop."""
        self._abort_cb = llama_cpp.ggml_abort_callback(should_abort)  # kept alive with the context

    def watch_abort(self, on: bool) -> None:
        """Let the abort callback stop decodes, or not (it costs a Python round trip per graph node)."""
        ctx = self.ctx
        if ctx is None:  # freed: nothing left to stop
            return
        cb = self._abort_cb if on and self._abort_cb is not None else llama_cpp.ggml_abort_callback()
        llama_cpp.llama_set_abort_callback(ctx, cb, None)


class TokenBatch:
    """A llama_batch: tokens of any sequences, each with its position and whether to keep its logits."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.batch.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Append one token; its index in the batch (where ``Sampler.sample`` finds its logits)."""
        i, b = self.n, self.batch
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq_id
        self.n = b.n_tokens = i + 1
        return i

    def __del__(self):
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None


PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over (llama-cpp-python's and llama.cpp's default)


class Sampler:
    """One sequence's llama.cpp sampler chain, as llama-cpp-python builds it: the repeat penalty, then
    greedy at temperature 0, else top-k, top-p, min-p, temperature and a seeded draw."""

    def __init__(self, context: Context, *, temp, top_k, top_p, min_p, repeat_penalty, seed):
        self.ctx = context.ctx
        # Greedy without a penalty keeps no state: the first highest logit, read directly. llama.cpp's
        # sample() copies all 49k logits into a candidate array first: ~105 us a token here against
        # ~8 us, paid once per running sequence per step.
        self.argmax_of = context.logits_view if temp == 0 and repeat_penalty == 1.0 else None
        self.chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.chain, s)  # noqa: E731 (the chain owns it)
        if repeat_penalty != 1.0:
            # this binding's signature has n_vocab first, then last_n (as llama.h of this build)
            add(llama_cpp.llama_sampler_init_penalties(context.handle.n_vocab(), PENALTY_LAST_N, repeat_penalty, 0.0, 0.0))
        if temp == 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(top_k))
            add(llama_cpp.llama_sampler_init_top_p(top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(temp))
            add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))  # -1: llama.cpp's "random seed"

    def accept(self, tokens: Sequence[int]) -> None:
        """Tokens the penalty should count (the prompt's last ones)."""
        for t in tokens[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(self.chain, t)

    def sample(self, index: int) -> int:
        """The next token from the logits at batch index ``index`` of the last decode (accepted)."""
        if self.argmax_of is not None:
            return int(self.argmax_of(index).argmax())  # numpy's argmax: the first highest, as llama.cpp's greedy
        return llama_cpp.llama_sampler_sample(self.chain, self.ctx, index)

    def close(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None

    __del__ = close
