"""The history store: messages, FTS5 search, export, and a process killed mid-reply."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgelora.conversation.history import History, HistoryError


def test_store_list_search_rename_export_delete(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    a = h.new()
    h.add(a, "user", "Tell me about lighthouses")
    h.add(a, "assistant", "A lighthouse guides ships at night.", label="base · no adapter")
    b = h.new()
    h.add(b, "user", "What is a volcano?")
    assert [c.id for c in h.list()] == [b, a]
    assert h.get(a).title == "Tell me about lighthouses"
    hits = h.search("ships")
    assert [(m.conversation_id, m.role) for m, _ in hits] == [(a, "assistant")] and "[ships]" in hits[0][1]
    h.rename(a, "Lighthouses")
    md = h.export_markdown(a)
    assert md.startswith("# Lighthouses") and "**Assistant** (base · no adapter):" in md
    h.delete(a)
    assert [c.id for c in h.list()] == [b] and h.search("ships") == []
    with pytest.raises(HistoryError, match="no conversation"):
        h.messages(a)
    with pytest.raises(HistoryError, match="search"):
        h.search('"unbalanced')


def test_ask_continue_uses_the_latest_conversation(tmp_path, isolated_home):
    def ask(*args):
        r = subprocess.run([sys.executable, "-m", "edgelora", "ask", *args, "--json", "--temperature", "0", "--max-tokens", "6"],
                           capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first = ask("My name is Ada. Say hi.")
    second = ask("-c", "What is my name?")
    assert second["conversation"] == first["conversation"]
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 6
    h = History(isolated_home / "history.sqlite3")
    assert [m.role for m in h.messages(first["conversation"])] == ["user", "assistant", "user", "assistant"]
    listed = subprocess.run([sys.executable, "-m", "edgelora", "history", "search", "Ada"], capture_output=True, text=True)
    assert str(first["conversation"]) in listed.stdout


KILLED = r"""
import sys, time
from edgelora import Engine, Roles
from edgelora.conversation.chat import ChatSession
from edgelora.config import Config
from edgelora.conversation.history import History
session = ChatSession(Roles(Engine(n_ctx=1024), Config()), History(sys.argv[1]), temperature=0.0, max_tokens=2000)
session.add_user("Name a colour.")
for _ in session.stream_reply(session.start_reply()):
    pass
session.add_user("Write a very long story about a dragon, with many chapters.")
print("streaming", flush=True)
for piece in session.stream_reply(session.start_reply()):
    time.sleep(0.01)
"""


def test_kill_9_during_generation_loses_only_the_reply(tmp_path):
    db = tmp_path / "h.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "streaming"
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    h = History(db)
    (conv,) = h.list()
    roles = [m.role for m in h.messages(conv.id)]
    assert roles == ["user", "assistant", "user"]  # everything but the reply being generated
    assert h.search("dragon")


def history_cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "edgelora", "history", *args], input=input,
                          capture_output=True, text=True, timeout=60)


def two_conversations(home):
    h = History(home / "history.sqlite3")
    a = h.new()
    h.add(a, "user", "Tell me about lighthouses")
    h.add(a, "assistant", "Arr, a lighthouse.", label="pirate · pirate×1 · 120 tok/s")
    h.add(a, "user", "And now plainly?")
    b = h.new()
    h.add(b, "user", "What is a volcano?")
    return h, a, b


def test_history_list_shows_the_role_of_the_last_answer(isolated_home):
    _, a, b = two_conversations(isolated_home)
    rows = history_cli("list").stdout.splitlines()
    assert rows[0].split()[0] == str(b) and " - " in rows[0]  # no answer yet
    assert rows[1].split()[0] == str(a) and "  pirate  " in rows[1]
    assert rows[1].endswith("Tell me about lighthouses")


def test_history_rm_asks_first_and_deletes_only_on_yes(isolated_home):
    h, a, b = two_conversations(isolated_home)
    kept = history_cli("rm", str(a), input="n\n")
    assert kept.returncode == 0 and "nothing deleted" in kept.stderr and "lighthouses" in kept.stderr
    assert {c.id for c in h.list()} == {a, b}
    gone = history_cli("rm", str(a), input="y\n")
    assert gone.returncode == 0 and f"deleted conversation {a}" in gone.stdout
    assert [c.id for c in h.list()] == [b] and h.search("lighthouse") == []
    assert history_cli("delete", "--yes", str(b)).returncode == 0
    assert h.list() == []


def test_history_rm_of_an_unknown_id_is_one_line_and_deletes_nothing(isolated_home):
    h, a, b = two_conversations(isolated_home)
    result = history_cli("rm", "--yes", str(a), "999")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"edgelora: error: no conversation 999 in {h.path}"]
    assert {c.id for c in h.list()} == {a, b}


def test_a_stopped_answer_is_saved_but_not_given_back_to_later_turns(tmp_path, clean_engine):
    """A half answer is no example to follow: kept in the store (marked stopped), left out of the context,
    also after a resume."""
    from edgelora.conversation.chat import ChatSession, is_stopped
    from edgelora.config import Config
    from edgelora.roles.session import Roles

    h = History(tmp_path / "h.sqlite3")
    session = ChatSession(Roles(clean_engine, Config()), h, max_tokens=64, temperature=0.0)
    session.add_user("Write a long story about a dragon.")
    reply = session.start_reply()
    for _ in session.stream_reply(reply):
        clean_engine.cancel()  # stopped after its first piece
    assert reply.stopped
    saved = h.messages(session.conversation)
    assert [m.role for m in saved] == ["user", "assistant"] and is_stopped(saved[-1].label) and saved[-1].content
    assert session.messages == [{"role": "user", "content": "Write a long story about a dragon."}]
    session.resume(session.conversation)
    assert session.messages == [{"role": "user", "content": "Write a long story about a dragon."}]
