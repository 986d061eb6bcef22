"""The one-shot CLI: stdin piping, --json, exit codes and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgelora.frontends.cli.main import cli
from edgelora.frontends.cli.options import parse_spec

GREEDY = ["--temperature", "0", "--seed", "0"]


def run_cli(*args, input=None):
    """The installed entry point in a subprocess: real exit code, real stderr."""
    return subprocess.run(
        [sys.executable, "-m", "edgelora", *args], input=input, capture_output=True, text=True, timeout=120
    )


def ask_json(runner, *args, input=None):
    result = runner.invoke(cli, ["ask", *args, "--json", *GREEDY], input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_the_documented_fields(smol_adapters):
    out = ask_json(CliRunner(), "Say hi.", "--max-tokens", "8", "--adapter", f"{smol_adapters['a']}:0.5")
    assert out["text"]
    assert out["model"].endswith(".gguf")
    assert out["adapters"] == [{"name": "a", "path": str(smol_adapters["a"]), "scale": 0.5}]
    assert out["usage"]["prompt_tokens"] > 5
    assert 1 <= out["usage"]["completion_tokens"] <= 8
    for key in ("load_s", "ttft_s", "tokens_per_s"):
        assert out["timings"][key] >= 0
    assert out["timings"]["ttft_s"] > 0


def test_stdin_goes_before_the_prompt():
    runner = CliRunner()
    both = ask_json(runner, "Summarize.", "--max-tokens", "4", input="The cat sat on the mat.\n")
    alone = ask_json(runner, "The cat sat on the mat.\n\nSummarize.", "--max-tokens", "4")
    assert both["usage"]["prompt_tokens"] == alone["usage"]["prompt_tokens"]
    assert both["text"] == alone["text"]


def test_prompt_may_come_from_stdin_alone():
    out = ask_json(CliRunner(), "--max-tokens", "4", input="What is 2+2?")
    assert out["usage"]["completion_tokens"] >= 1


def test_system_prompt_changes_the_prompt():
    runner = CliRunner()
    plain = ask_json(runner, "Hi", "--max-tokens", "2")
    with_system = ask_json(runner, "Hi", "-s", "You are a terse assistant who answers in French.", "--max-tokens", "2")
    assert with_system["usage"]["prompt_tokens"] != plain["usage"]["prompt_tokens"]


def test_streamed_and_no_stream_print_the_same_text():
    runner = CliRunner()
    streamed = runner.invoke(cli, ["ask", "Name a fruit.", "--max-tokens", "12", *GREEDY])
    whole = runner.invoke(cli, ["ask", "Name a fruit.", "--max-tokens", "12", "--no-stream", *GREEDY])
    assert streamed.exit_code == whole.exit_code == 0
    assert streamed.stdout == whole.stdout and streamed.stdout.strip()


@pytest.mark.parametrize(
    "args, text",
    [
        (["ask", "hi", "--adapter", "/no/such/file.gguf"], "/no/such/file.gguf: no such file"),
        (["ask", "hi", "-m", "/no/such/model.gguf"], "model /no/such/model.gguf: no such file"),
        (["ask", "hi", "--temperature", "hot"], "--temperature"),
        (["ask", "hi", "--max-tokens", "0"], "--max-tokens"),
        (["ask", "hi", "--bogus"], "--bogus"),
        (["ask"], "no prompt"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, text):
    result = run_cli(*args, input="")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgelora: error:") and text in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_bad_adapter_file_exits_2_naming_it(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    result = run_cli("ask", "hi", "--adapter", str(bad), input="")
    assert result.returncode == 2
    assert "broken.gguf" in result.stderr and "Traceback" not in result.stderr


def test_adapter_file_as_model_is_refused(smol_adapters):
    result = run_cli("ask", "hi", "-m", str(smol_adapters["a"]), input="")
    assert result.returncode == 2
    assert "is a LoRA adapter, not a base model" in result.stderr


def test_doctor_reports_backend_and_default_model(smol_path):
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["backend"] in ("CPU", "CUDA", "Metal", "Vulkan") or "+" in report["backend"]
    assert isinstance(report["gpu_offload"], bool)
    assert report["model"]["path"] == str(smol_path)
    assert len(report["model"]["sha256"]) == 64


def test_parse_spec():
    assert parse_spec("a.gguf:0.5", "--adapter") == ("a.gguf", 0.5)
    assert parse_spec("a.gguf", "--adapter") == ("a.gguf", 1.0)
    assert parse_spec("dir:x/a.gguf", "--adapter") == ("dir:x/a.gguf", 1.0)


# ---------------------------------------------------------------------------- help, completion, inspect, doctor


def walk(command, parent=None, name="edgelora"):
    """Every click context in the tree, each under its parent (help option names are inherited)."""
    ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
    yield ctx
    for sub_name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, ctx, sub_name)


def test_every_command_and_option_has_help():
    missing = []
    for ctx in walk(cli):
        command = ctx.command
        if not (command.help or command.short_help):
            missing.append(ctx.command_path)
        for param in command.get_params(ctx):
            if isinstance(param, click.Option) and not param.help:
                missing.append(f"{ctx.command_path} {param.opts[-1]}")
    assert missing == []


@pytest.mark.parametrize("args", [["-h"], ["history", "-h"], ["history", "list", "-h"], ["ask", "-h"], ["roles", "show", "-h"]])
def test_dash_h_is_help_everywhere(args):
    result = CliRunner().invoke(cli, args, prog_name="edgelora")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: edgelora") and "-h, --help" in result.stdout


def complete(line: str) -> list[str]:
    """What `edgelora` offers for a Tab at the end of `line`, through click's bash protocol."""
    words = line.split(" ")
    env = {"_EDGELORA_COMPLETE": "bash_complete", "COMP_WORDS": line, "COMP_CWORD": str(len(words) - 1)}
    result = CliRunner().invoke(cli, [], env=env, prog_name="edgelora")
    assert result.exit_code == 0, result.output
    return [row.split(",", 1)[1] for row in result.stdout.splitlines() if row.startswith("plain,")]


def test_completion_lists_installed_roles_and_catalog_models(isolated_home, smol_adapters):
    from .conftest import write_role

    write_role(isolated_home / "roles", "pilot", smol_adapters["a"])  # a role the user added
    assert complete("edgelora ask --role pi") == ["pilot", "pirate"]
    assert complete("edgelora chat --preload ter") == ["terse"]
    assert complete("edgelora roles show pil") == ["pilot"]
    assert complete("edgelora export pirate:0.7+te") == ["pirate:0.7+terse"]
    assert complete("edgelora ask --role pirate:0") == []  # a weight is being typed
    assert "auto" in complete("edgelora chat --role ")
    assert complete("edgelora ask -m smollm") == ["smollm2-135m-instruct"]


def test_completion_script_is_printed_by_the_entry_point():
    result = subprocess.run([sys.executable, "-m", "edgelora"], env={**os.environ, "_EDGELORA_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "_edgelora_completion" in result.stdout and result.stderr == ""


PIRATE = str(Path(__file__).parents[1] / "adapters" / "pirate.gguf")


def test_inspect_summarizes_an_adapter_and_lists_tensors_on_request():
    runner = CliRunner()
    result = runner.invoke(cli, ["inspect", PIRATE])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) < 20 and "{" not in result.stdout  # no tensor table, no raw dict
    fields = dict(line.split(":", 1) for line in lines)
    assert fields["type"].strip() == "LoRA adapter" and fields["architecture"].strip() == "llama"
    assert fields["rank"].strip() == "8" and fields["alpha"].strip().startswith("16")
    assert fields["layers"].strip() == "0-29"
    assert "attn_q" in fields["targets"] and fields["tensors"].strip().startswith("180")
    full = runner.invoke(cli, ["inspect", PIRATE, "--tensors"])
    assert "blk.0.attn_q.weight.lora_a" in full.stdout and len(full.stdout.splitlines()) > 180
    as_json = json.loads(runner.invoke(cli, ["inspect", PIRATE, "--json"]).stdout)
    assert len(as_json["tensors"]) == 180 and as_json["adapter"]["ranks"] == [8]


def test_inspect_summarizes_a_model(smol_path):
    result = CliRunner().invoke(cli, ["inspect", str(smol_path)])
    fields = dict((k, v.strip()) for k, v in (line.split(":", 1) for line in result.stdout.splitlines()))
    assert fields["type"] == "model" and fields["layers"] == "30" and fields["quantization"] == "Q4_1"
    assert fields["heads"] == "9 (3 KV)" and fields["chat template"] == "yes"


def test_doctor_text_says_what_unset_values_mean_and_reports_the_routing_model(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("EDGELORA_CPU_EXTRA_BUFFERS", "on")  # decided by the setting: no probe runs
    text = CliRunner().invoke(cli, ["doctor"]).stdout
    rows = dict(line.split(None, 1) for line in text.splitlines() if line.startswith(("cpu.", "routing_model.")))
    assert rows["cpu.omp_wait_policy"] == "default (unset)"
    assert rows["cpu.probe_s"] == "not run"
    assert "None" not in text
    assert rows["routing_model.installed"] == "True"
    report = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).stdout)
    assert report["cpu"]["omp_wait_policy"] == "" and "probe_s" in report["cpu"]  # JSON unchanged
    assert report["routing_model"]["installed"] is True
    assert (Path(report["routing_model"]["path"]) / "model.safetensors").is_file()


def test_doctor_says_when_the_routing_model_is_missing(monkeypatch):
    from edgelora.routing import embedder

    monkeypatch.setattr(embedder, "DIST", "no-such-routing-model-package")
    result = CliRunner().invoke(cli, ["doctor"])
    assert "routing_model.installed" in result.stdout and "False" in result.stdout
    assert "--role auto routes by word overlap only" in result.stdout


@pytest.mark.parametrize("odd", ["string alpha", "rank 0", "file_type a list"])
def test_inspect_of_an_odd_gguf_prints_its_summary_without_a_traceback(tmp_path, odd):
    import gguf
    import numpy as np

    from .gguf_factory import write_lora

    rank = 0 if odd == "rank 0" else 2
    lora = {"blk.0.attn_q.weight": (np.ones((rank, 8), np.float32), np.ones((8, rank), np.float32))}
    kv = {"string alpha": {"adapter.lora.alpha": ("16", gguf.GGUFValueType.STRING)},
          "rank 0": {},
          "file_type a list": {"general.file_type": ([1, 2], gguf.GGUFValueType.ARRAY)}}[odd]
    path = write_lora(tmp_path / "odd.gguf", lora, None if odd == "string alpha" else 16.0, kv=kv,
                      general_type="model" if odd == "file_type a list" else "adapter")
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0 and result.exception is None, result.output
    fields = dict((k, v.strip()) for k, v in (line.split(":", 1) for line in result.stdout.splitlines()))
    expected = {"string alpha": ("alpha", "'16' (not a number)"), "rank 0": ("alpha", "16"),
                "file_type a list": ("quantization", "[1, 2]")}[odd]
    assert fields[expected[0]] == expected[1]
