"""The chat app, driven with Pilot on the real engine and the real model."""

from __future__ import annotations

import pytest

from edgelora.conversation.chat import ChatSession
from edgelora.config import Config
from edgelora.conversation.history import History
from edgelora.roles.manifest import RoleCatalog
from edgelora.roles.session import Roles
from edgelora.frontends.tui.app import EdgeloraApp
from edgelora.frontends.tui.widgets import ChatMessage, PromptInput, RolesPanel

from .conftest import write_role

SIZE = (80, 24)


@pytest.fixture
def roles_dir(tmp_path, smol_adapters):
    d = tmp_path / "roles"
    for name in ("a", "b"):
        write_role(d, name, smol_adapters[name])
    return d


@pytest.fixture
def make_app(clean_engine, roles_dir, tmp_path):
    def make(max_tokens=16, resume=None, history=None):
        roles = Roles(clean_engine, Config(), catalog=RoleCatalog([roles_dir]))
        history = history or History(tmp_path / "history.sqlite3")
        session = ChatSession(roles, history, temperature=0.0, seed=0, max_tokens=max_tokens)
        return EdgeloraApp(session, resume=resume)
    return make


async def type_and_send(pilot, text, *, fast=False):
    if fast:  # the whole text at once, so it lands while a reply is still streaming
        pilot.app.query_one(PromptInput).load_text(text)
    else:
        await pilot.press(*text)
    await pilot.press("enter")
    await pilot.pause()


async def idle(app, pilot):
    await app.workers.wait_for_complete()
    await pilot.pause()


def replies(app):
    return [m for m in app.query(ChatMessage) if m.role == "assistant"]


def expected(roles_dir, engine, messages, specs, max_tokens=16):
    """What the same roles answer outside the app, for the same messages (greedy)."""
    roles = Roles(engine, Config(), catalog=RoleCatalog([roles_dir]))
    roles.use(specs)
    engine.new_conversation()
    return roles.chat(messages, temperature=0.0, seed=0, max_tokens=max_tokens).text


async def test_send_streams_and_labels_the_reply(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Name a colour.")
        await idle(app, pilot)
        (reply,) = replies(app)
        assert reply.text.strip()
        assert reply.label.startswith("base · no adapter · ") and reply.label.endswith("tok/s")
        assert app.session.messages[-1] == {"role": "assistant", "content": reply.text}


async def test_switch_role_mid_chat_next_reply_uses_it(make_app, roles_dir, clean_engine):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Name a colour.")
        await idle(app, pilot)
        await type_and_send(pilot, "/role a")
        assert clean_engine.active == {"a": 1.0}
        await type_and_send(pilot, "And a fruit?")
        await idle(app, pilot)
        first, second = replies(app)
        assert first.label.startswith("base ·") and second.label.startswith("a · a×1")
        messages = list(app.session.messages[:-1])
    assert second.text == expected(roles_dir, clean_engine, messages, ["a"])


async def test_roles_panel_and_mix_and_scale(make_app, clean_engine):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(RolesPanel)
        panel.focus()
        panel.highlighted = [o.id for o in panel._options].index("b")
        await pilot.press("enter")
        await pilot.pause()
        assert clean_engine.active == {"b": 1.0}
        app.query_one("#prompt").focus()
        await type_and_send(pilot, "/mix a:0.5 b:0.5")
        assert clean_engine.active == {"a": 0.5, "b": 0.5}
        await type_and_send(pilot, "/scale a 0.2")
        assert clean_engine.active == {"a": 0.2, "b": 0.5}
        await type_and_send(pilot, "/role nope")  # an error notification; nothing changes
        assert clean_engine.active == {"a": 0.2, "b": 0.5}
        await type_and_send(pilot, "/base")
        assert clean_engine.active == {}


async def test_escape_stops_a_reply(make_app):
    app = make_app(max_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Write a long story about a dragon.")
        await pilot.pause(0.3)
        await pilot.press("escape")
        await idle(app, pilot)
        (reply,) = replies(app)
        assert reply.label.endswith("stopped")
        assert app.session.engine.last.completion_tokens < 400


async def test_switch_while_streaming_stops_first_and_labels_truthfully(make_app, clean_engine):
    app = make_app(max_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Write a long story about a dragon.")
        await pilot.pause(0.3)
        assert app.generating
        await type_and_send(pilot, "/role b", fast=True)  # arrives while the base is still answering
        await idle(app, pilot)
        assert clean_engine.active == {"b": 1.0}
        (stopped,) = replies(app)
        assert stopped.label.startswith("base ·") and stopped.label.endswith("stopped")
        app.session.sampling["max_tokens"] = 8
        await type_and_send(pilot, "Hi")
        await idle(app, pilot)
        assert replies(app)[-1].label.startswith("b · b×1")


async def test_new_prompt_while_streaming_is_safe(make_app):
    app = make_app(max_tokens=400)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Write a long story about a dragon.")
        await pilot.pause(0.2)
        assert app.generating
        app.session.sampling["max_tokens"] = 8
        await type_and_send(pilot, "Name a colour.", fast=True)
        await idle(app, pilot)
        first, second = replies(app)
        assert first.label.endswith("stopped") and second.text.strip()


async def test_resume_a_saved_conversation(make_app, tmp_path):
    history = History(tmp_path / "saved.sqlite3")
    app = make_app(history=history)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Name a colour.")
        await idle(app, pilot)
        said = replies(app)[0].text
        conversation = app.session.conversation
    history.close()

    reopened = History(tmp_path / "saved.sqlite3")  # as after a restart
    app = make_app(history=reopened, resume=conversation)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        shown = [(m.role, m.text) for m in app.query(ChatMessage)]
        assert shown == [("user", "Name a colour."), ("assistant", said)]
        await type_and_send(pilot, "And a fruit?")
        await idle(app, pilot)
    assert [m.role for m in reopened.messages(conversation)] == ["user", "assistant", "user", "assistant"]


async def test_compare_answers_with_two_roles_and_restores(make_app, clean_engine, roles_dir):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "Name a colour.")
        await idle(app, pilot)
        await type_and_send(pilot, "/compare a b")
        await pilot.pause()
        screen = app.screen
        await screen._worker.wait()
        await pilot.pause()
        left, right = (screen.query_one(f".side-{i}", ChatMessage) for i in (0, 1))
        assert left.label.startswith("a · a×1") and right.label.startswith("b · b×1")
        assert left.text and right.text and left.text != right.text
        await pilot.press("escape")
        await pilot.pause()
        assert clean_engine.active == {}  # back to the base role
        prompt = [{"role": "user", "content": "Name a colour."}]
    assert left.text == expected(roles_dir, clean_engine, prompt, ["a"])


async def test_input_is_multiline_with_history(make_app):
    app = make_app(max_tokens=4)
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.query_one(PromptInput)
        await pilot.press(*"line one", "ctrl+j", *"line two")
        assert prompt.text == "line one\nline two"
        await pilot.press("enter")
        await idle(app, pilot)
        assert app.session.messages[0]["content"] == "line one\nline two" and prompt.text == ""
        await pilot.press("up")
        assert prompt.text == "line one\nline two"


async def test_roles_sharing_one_adapter_file_are_labelled_by_the_role_chosen(make_app, roles_dir, smol_adapters,
                                                                               tmp_path):
    """A copy of a's manifest installed as 'mya' loads the file first; a's answers still say 'a'."""
    from edgelora.frontends.tui.widgets import StatusBar

    write_role(roles_dir, "mya", smol_adapters["a"])
    app = make_app(max_tokens=2)
    async with app.run_test(size=(120, 35)) as pilot:
        await type_and_send(pilot, "/role mya")
        await type_and_send(pilot, "Hi")
        await idle(app, pilot)
        await type_and_send(pilot, "/role a")
        await type_and_send(pilot, "Hello")
        await idle(app, pilot)
        assert [r.label.split(" · ")[:2] for r in replies(app)] == [["mya", "mya×1"], ["a", "a×1"]]
        assert " · a×1 · " in str(app.query_one(StatusBar).render())
        saved = app.session.history.messages(app.session.conversation)
        assert [m.label.split(" · ")[:2] for m in saved if m.role == "assistant"] == [["mya", "mya×1"], ["a", "a×1"]]
        await type_and_send(pilot, "/compare mya a")
        await pilot.pause()
        await app.screen._worker.wait()
        await pilot.pause()
        left, right = (app.screen.query_one(f".side-{i}", ChatMessage) for i in (0, 1))
        assert left.label.startswith("mya · mya×1") and right.label.startswith("a · a×1")
