"""Issue 22, second hardening pass: converter patterns, chat template size, native cleanup at exit,
non-finite numbers in manifests and settings. Each test failed before its fix."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from gguf import GGUFValueType as T

from edgelora import errors

from . import gguf_factory as gf
from .conftest import GREEDY
from .test_convert_refusals import make_peft
from .test_hardening import MSG, one_line_exit_2, run


# 10 ------------------------------------------------------------------------ PEFT patterns are time-limited
def test_a_peft_pattern_that_backtracks_forever_in_re_converts_promptly(tmp_path, smol_path):
    folder = make_peft(tmp_path / "src", config={"rank_pattern": {"(.*)*z": 4}})
    t0 = time.monotonic()
    result = run("convert", str(folder), "--base", str(smol_path), "--dry-run", timeout=60)  # Python's re: hours
    assert result.returncode == 0, result.stderr[-400:]
    assert time.monotonic() - t0 < 60


def test_a_peft_pattern_that_runs_out_of_time_is_one_line_naming_it(tmp_path, smol_path):
    folder = make_peft(tmp_path / "src", config={"alpha_pattern": {r"(.|.)*\s": 16}})
    result = run("convert", str(folder), "--base", str(smol_path), "-o", str(tmp_path / "o.gguf"), timeout=60)
    one_line_exit_2(result, "adapter_config.json", "alpha_pattern", r"'(.|.)*\\s'", "backtracking")
    assert not (tmp_path / "o.gguf").exists()


# 11 ------------------------------------------------------------------------ a chat template's output is bounded
VERBOSE_TEMPLATE = ("{% for i in range(100000) %}" + "x" * 200 + "{% endfor %}"  # 20 MB before the messages
                    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


def test_a_chat_template_that_writes_megabytes_is_stopped_in_the_engine(engine):
    saved = engine._formatter
    engine._formatter = engine._chat_formatter(VERBOSE_TEMPLATE)
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.ModelError, match="chat template wrote over .* characters, more than the 1024-token"):
            engine.render_chat(MSG)
        assert time.monotonic() - t0 < 5
    finally:
        engine._formatter = saved
    assert engine.chat(MSG, max_tokens=2, **GREEDY).text


def test_a_base_whose_chat_template_writes_megabytes_is_one_line_from_ask(smol_path, tmp_path):
    weights = gf.tiny_weights(len(gf.gguf.GGUFReader(smol_path).fields["tokenizer.ggml.tokens"].data), seed=0)
    base = gf.write_llama(tmp_path / "verbose.gguf", weights, smol_path,
                          kv={"tokenizer.chat_template": (VERBOSE_TEMPLATE, T.STRING)})
    t0 = time.monotonic()
    one_line_exit_2(run("ask", "hi", "-m", str(base), "--no-log", timeout=60), "chat template wrote over")
    assert time.monotonic() - t0 < 60  # before: nothing printed for minutes


def test_messages_longer_than_any_context_are_refused_before_rendering(engine):
    with pytest.raises(errors.EdgeloraError, match="raise --ctx"):
        engine.render_chat([{"role": "user", "content": "word " * 2_000_000}])
    assert engine.chat(MSG, max_tokens=2, **GREEDY).text


# 16 ------------------------------------------------------------------------ native handles at exit
STREAM_LEFT_OPEN = """
from edgelora import Engine
eng = Engine(n_ctx=256)
stream = eng.stream_chat([{"role": "user", "content": "Tell me a story."}], max_tokens=50, temperature=0.0)
next(stream)
eng.chat([{"role": "user", "content": "hi"}], max_tokens=2)  # EngineBusyError, uncaught
"""


def python(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("attempt", range(3))
def test_a_script_dying_with_a_stream_open_exits_with_its_traceback(attempt):
    result = python(STREAM_LEFT_OPEN)
    assert result.returncode == 1, (result.returncode, result.stderr[-600:])  # not 139
    assert result.stderr.rstrip().splitlines()[-1].startswith("edgelora.errors.EngineBusyError: a generation is still")


def test_native_handles_are_released_safely_whatever_order_the_collector_frees_them(smol_adapters):
    """At exit the collector may finalize the Llama (context, model) before an open stream's cleanup
    or the engine's own close; each order is forced here, one after the other."""
    result = python("""
        import sys
        from edgelora import Engine
        eng = Engine(n_ctx=256)
        stream = eng.stream_chat([{"role": "user", "content": "Tell me a story."}], max_tokens=50, temperature=0.0)
        next(stream)
        eng.llama._ctx.close()  # the context first (LlamaContext.__del__)
        stream.close()
        print("stream closed after its context", flush=True)

        eng = Engine(n_ctx=256)
        eng.attach(sys.argv[1], name="a")
        eng.llama.close()  # the model first, and the adapters llama.cpp frees with it (Llama.__del__)
        eng.close()
        print("engine closed after its model", flush=True)
    """, str(smol_adapters["a"]))
    assert result.returncode == 0, (result.returncode, result.stderr[-600:])  # was 139 (SIGSEGV)
    assert result.stdout.splitlines() == ["stream closed after its context", "engine closed after its model"]
