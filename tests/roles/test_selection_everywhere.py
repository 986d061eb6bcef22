"""The same role selection means the same thing in every front end and is refused the same way:
`ask --role` (exit 2, one line), the chat's /mix and /role (ChatSession, as the TUI and the line
chat drive it), the server's `model` (400, the same message), and `export`. Real engine, bundled roles."""

from __future__ import annotations

import io

import pytest
from starlette.testclient import TestClient

from edgelora.conversation.chat import ChatSession, role_specs_for
from edgelora.conversation.history import History
from edgelora.errors import SelectionError
from edgelora.frontends.cli.main import main
from edgelora.frontends.server.app import Service, build_app, loopback_hosts
from edgelora.roles.selection import parse_selection
from edgelora.roles.session import Roles

BAD = ["pirate+pirate", "auto+pirate", "pirate:abc", "pirate:0.5+terse:1e0+pirate"]


@pytest.fixture
def roles(clean_engine):
    return Roles(clean_engine)


@pytest.fixture
def client(clean_engine):
    app = build_app(Service(clean_engine, Roles(clean_engine)), allowed_hosts=loopback_hosts("127.0.0.1"))
    with TestClient(app, base_url="http://127.0.0.1:8080", raise_server_exceptions=False) as c:
        yield c


def the_error(spec: str) -> str:
    with pytest.raises(SelectionError) as info:
        parse_selection(spec)
    return str(info.value)


@pytest.mark.parametrize("spec", BAD)
def test_a_bad_selection_is_refused_alike_by_ask_the_chat_and_the_server(spec, roles, client, capsys, monkeypatch):
    message = the_error(spec)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))

    assert main(["ask", *[a for part in spec.split("+") for a in ("--role", part)], "hi", "--no-log"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "--role" in err

    before = roles.current.label
    with pytest.raises(SelectionError) as chat_error:
        roles.use(role_specs_for("mix", spec.split("+")))  # /mix a b, as the TUI and the line chat run it
    assert str(chat_error.value) == message and roles.current.label == before

    r = client.post("/v1/chat/completions", json={"model": spec, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["message"] == message and r.json()["error"]["param"] == "model"


def test_the_server_takes_a_stack_as_ask_does_and_names_it_canonically(client):
    r = client.post("/v1/chat/completions", json={"model": "pirate:0.70 + terse:0.3",
                                                  "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["edgelora"]["role"] == "pirate:0.7 + terse:0.3"


def test_the_server_reads_no_manifest_file_a_client_names(client, tmp_path):
    r = client.post("/v1/chat/completions", json={"model": str(tmp_path / "x.toml"),
                                                  "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 400 and "manifest paths are not taken over HTTP" in r.json()["error"]["message"]


def test_an_out_of_range_sampling_value_is_a_400_naming_the_field(client):
    r = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "hi"}],
                                                  "temperature": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert r.json()["error"]["message"] == "'temperature' must be a number from 0 to 2, got 3"


def test_the_history_keeps_the_selection_and_continuing_restores_it(roles, tmp_path):
    history = History(tmp_path / "h.sqlite3")
    session = ChatSession(roles, history, temperature=0, max_tokens=2)
    roles.use("pirate:0.5+terse:0.5")
    session.add_user("hi")
    for _ in session.stream_reply(session.start_reply()):
        pass
    assert history.selection(session.conversation) == "pirate:0.5+terse:0.5"
    roles.use("base")
    assert session.saved_selection(session.conversation) == parse_selection("pirate:0.5+terse:0.5")


def test_an_old_history_with_only_a_label_still_resumes_its_role(roles, tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # the schema before selections were saved: no column for it
    old.executescript("""
        CREATE TABLE conversations (id INTEGER PRIMARY KEY, title TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
                                    updated REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL, role TEXT NOT NULL,
                               content TEXT NOT NULL, label TEXT NOT NULL DEFAULT '', created REAL NOT NULL);
        INSERT INTO conversations VALUES (1, 'old', 0, 0);
        INSERT INTO messages VALUES (1, 1, 'user', 'hi', '', 0);
        INSERT INTO messages VALUES (2, 1, 'assistant', 'arr', 'pirate + terse:0.3 · pirate×1, terse×0.3', 0);
    """)
    old.commit()
    old.close()
    session = ChatSession(roles, History(path))
    assert session.saved_selection(1) == parse_selection("pirate+terse:0.3")
    assert [m.content for m in session.history.messages(1)] == ["hi", "arr"]
