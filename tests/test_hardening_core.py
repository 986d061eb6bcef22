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
from edgelora.runtime.engine import Engine

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


# 18 ------------------------------------------------------------------------ no non-finite numbers, no ignored setting
@pytest.mark.parametrize("section, body, key, shown", [
    ("sampling", "temperature = inf", "sampling.temperature", "inf"),
    ("sampling", "top_p = nan", "sampling.top_p", "nan"),
    ("sampling", "min_p = -inf", "sampling.min_p", "-inf"),
    (None, "scale = nan", "adapters[0].scale", "nan"),
])
def test_a_manifest_with_a_non_finite_number_is_refused_naming_the_file_and_key(tmp_path, smol_adapters, section, body,
                                                                                key, shown):
    from edgelora.roles.manifest import RoleError, load_manifest

    from .conftest import write_role

    if section:
        path = write_role(tmp_path, "odd", smol_adapters["a"], **{section: body})
    else:
        path = write_role(tmp_path, "odd", smol_adapters["a"], scale=body.split()[-1])
    with pytest.raises(RoleError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}: '{key}' must be a finite number, got {shown}"


@pytest.mark.parametrize("weight", ["inf", "nan", "-inf"])
def test_an_include_weight_that_is_not_finite_is_refused_naming_the_file(tmp_path, smol_adapters, weight):
    from edgelora.roles.manifest import RoleError, load_manifest

    from .conftest import write_role

    path = write_role(tmp_path, "mix", smol_adapters["a"], extra=f'include = ["other:{weight}"]')
    with pytest.raises(RoleError, match=rf"^{path}: 'include': role 'other:{weight}': the weight after ':' must be a finite"):
        load_manifest(path)


def test_roles_add_refuses_an_infinite_temperature_in_one_line(tmp_path, smol_adapters, isolated_home):
    from .conftest import write_role

    path = write_role(tmp_path, "hot", smol_adapters["a"], sampling="temperature = inf")
    one_line_exit_2(run("roles", "add", str(path)), str(path), "sampling.temperature", "finite")
    assert not (isolated_home / "roles").exists() or not list((isolated_home / "roles").rglob("hot*"))


@pytest.mark.parametrize("value", ["-inf", "inf", "nan"])
def test_a_config_with_a_non_finite_route_threshold_is_refused(isolated_home, value):
    from edgelora.config import ConfigError, load_config

    path = isolated_home / "config.toml"
    path.write_text(f"route_threshold = {value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: 'route_threshold' must be a finite number, got {value}$"):
        load_config()


def test_a_bogus_gpu_adapters_setting_is_an_error_on_a_cpu_engine_too(smol_path, monkeypatch):
    monkeypatch.setenv("EDGELORA_GPU_ADAPTERS", "bogus")
    with pytest.raises(errors.EdgeloraError, match="^EDGELORA_GPU_ADAPTERS: must be one of auto, on, off, got 'bogus'$"):
        Engine(smol_path, n_gpu_layers=0, n_ctx=256)
    one_line_exit_2(run("ask", "hi", "--no-log", "--max-tokens", "2", env={"EDGELORA_GPU_ADAPTERS": "bogus"}),
                    "EDGELORA_GPU_ADAPTERS", "auto, on, off")
