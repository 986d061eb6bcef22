"""`edgelora chat --plain`: the line chat, driven through the real CLI with piped stdin and the real model."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from edgelora.frontends.cli.main import cli
from edgelora.conversation.history import History

GREEDY = ["--temperature", "0", "--max-tokens", "6"]


def chat(*args, input: str):
    """`edgelora chat` in this process (a model load, no interpreter start): stdin and stdout are not terminals."""
    result = CliRunner().invoke(cli, ["chat", *args, *GREEDY], input=input, prog_name="edgelora")
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def conversations(home) -> list[list]:
    store = History(home / "history.sqlite3")
    return [store.messages(c.id) for c in sorted(store.list(), key=lambda c: c.id)]


def role_of(message) -> str:
    return message.label.split(" · ", 1)[0]


def test_piped_chat_answers_each_line_with_the_role_in_force_and_saves_it(isolated_home):
    script = ("Say hi.\n"
              "/role pirate\n"
              "Where is the treasure?\n"
              "/mix pirate:0.7 terse:0.3\n"
              "And the ship?\n"
              "/new\n"
              "Name a colour.\n")  # then end of input, as Ctrl+D
    result = chat("--plain", input=script)
    assert result.exit_code == 0, result.stderr
    first, second = conversations(isolated_home)
    assert [(m.role, m.content) for m in first if m.role == "user"] == [
        ("user", "Say hi."), ("user", "Where is the treasure?"), ("user", "And the ship?")]
    assert [m.role for m in first] == ["user", "assistant"] * 3
    assert [role_of(m) for m in first if m.role == "assistant"] == ["base", "pirate", "pirate:0.7 + terse:0.3"]
    assert [(m.role, m.content) for m in second][0] == ("user", "Name a colour.")
    assert [m.role for m in second] == ["user", "assistant"]
    answers = [m.content for conv in (first, second) for m in conv if m.role == "assistant"]
    assert all(answers)
    # stdout carries the answers and nothing else; role changes go to stderr
    assert result.stdout == "".join(a + "\n" for a in answers)
    assert "now pirate" in result.stderr and "new conversation" in result.stderr


def test_chat_without_a_terminal_is_the_line_chat_and_quit_stops_reading(isolated_home):
    result = chat(input="/help\nSay hi.\n/quit\nNever sent.\n")
    assert result.exit_code == 0, result.stderr
    assert "/mix a:0.7 b:0.3" in result.stderr  # the help, on stderr
    (conv,) = conversations(isolated_home)
    assert [m.content for m in conv if m.role == "user"] == ["Say hi."]
    assert result.stdout == conv[1].content + "\n"


def test_continue_resumes_the_latest_conversation(isolated_home):
    assert chat("--plain", input="My name is Ada.\n").exit_code == 0
    result = chat("--plain", "-c", input="What is my name?\n")
    assert result.exit_code == 0, result.stderr
    (conv,) = conversations(isolated_home)
    assert [m.content for m in conv if m.role == "user"] == ["My name is Ada.", "What is my name?"]
    assert [m.role for m in conv] == ["user", "assistant"] * 2


def test_a_bad_command_in_piped_input_stops_with_one_line_and_keeps_what_was_said(isolated_home):
    # through the installed entry point: the real exit code and stderr
    result = subprocess.run([sys.executable, "-m", "edgelora", "chat", "--plain", *GREEDY], capture_output=True, text=True,
                            input="Say hi.\n/role nosuchrole\nNot answered with the wrong role.\n", timeout=180)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("edgelora: error:") and "nosuchrole" in lines[-1]
    assert "Traceback" not in result.stderr
    (conv,) = conversations(isolated_home)
    assert [m.content for m in conv if m.role == "user"] == ["Say hi."]
    assert [m.role for m in conv] == ["user", "assistant"]


def test_at_a_terminal_there_is_a_prompt_and_a_bad_command_does_not_end_the_chat(isolated_home):
    import os
    import pty
    import select
    import signal
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin and stdout are the terminal
        os.execv(sys.executable, [sys.executable, "-m", "edgelora", "chat", "--plain", *GREEDY])

    def read_until(text: str, timeout: float = 120.0) -> str:
        seen, end = "", time.monotonic() + timeout
        while text not in seen and time.monotonic() < end:
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 4096).decode(errors="replace")
        assert text in seen, seen
        return seen

    try:
        read_until(">>> ")
        os.write(fd, b"/role nosuchrole\n")
        assert "edgelora: error: unknown role 'nosuchrole'" in read_until(">>> ")
        os.write(fd, b"Say hi.\n")
        read_until(">>> ")
        os.write(fd, b"\x04")  # Ctrl+D
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    (conv,) = conversations(isolated_home)
    assert [m.role for m in conv] == ["user", "assistant"] and conv[0].content == "Say hi."


def test_with_stdout_redirected_the_prompt_goes_to_the_terminal_and_stdout_holds_only_answers(isolated_home):
    # `edgelora chat > log.txt` typed at a terminal: stdin and stderr are the terminal, stdout a pipe
    import os
    import pty
    import select
    import time

    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "edgelora", "chat", "--plain", *GREEDY],
                            stdin=slave, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)

    def read_until(text: str, timeout: float = 120.0) -> str:
        seen, end = "", time.monotonic() + timeout
        while text not in seen and time.monotonic() < end:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096).decode(errors="replace")
        assert text in seen, seen
        return seen

    try:
        read_until(">>> ")  # the prompt, on the terminal
        os.write(master, b"Say hi.\n")
        read_until(">>> ")
        os.write(master, b"\x04")  # Ctrl+D
        out, _ = proc.communicate(timeout=60)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.close(master)
    assert proc.returncode == 0
    (conv,) = conversations(isolated_home)
    assert [m.role for m in conv] == ["user", "assistant"]
    assert out.decode() == conv[1].content + "\n"  # the answer and nothing else: no '>>> '


def test_library_modules_do_not_import_the_cli():
    import ast
    from pathlib import Path

    import edgelora

    package = Path(edgelora.__file__).parent
    importers = []
    for source in package.rglob("*.py"):
        if source.parent == package and source.name in ("cli.py", "__main__.py"):
            continue
        where = source.relative_to(package.parent).with_suffix("").parts  # ('edgelora', 'tui', 'app')
        for node in ast.walk(ast.parse(source.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(where[:-node.level]) if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                if module == "edgelora.cli" or (module == "edgelora" and "cli" in [a.name for a in node.names]):
                    importers.append(source.relative_to(package).as_posix())
    assert importers == []
