"""The one-shot CLI: stdin piping, --json, exit codes and one-line errors."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgelora.cli import cli, parse_spec

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
