"""What a newcomer found in the chat app: history window focus, markup in user text, Ctrl+Y from the
input, the auto label, delete confirmation. Pilot on the real engine."""

from __future__ import annotations

from rich.console import Console
from textual.widgets import Input, OptionList

from edgelora.conversation.history import History
from edgelora.frontends.tui.screens import HistoryScreen
from edgelora.frontends.tui.widgets import ChatMessage, PromptInput

from .test_tui import SIZE, idle, make_app, replies, roles_dir, type_and_send  # noqa: F401 (fixtures)


def _history_with(tmp_path, *titles):
    h = History(tmp_path / "history.sqlite3")
    for t in titles:
        cid = h.new()
        h.add(cid, "user", t)
        h.add(cid, "assistant", "ok", label="base · no adapter")
    return h


async def test_history_window_types_into_search_and_has_a_row_selected(make_app, tmp_path):
    h = _history_with(tmp_path, "What is the [moon]?", "Tell me about ships")
    app = make_app(history=h)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, HistoryScreen)
        assert app.focused is screen.query_one(Input)  # typing searches at once
        options = screen.query_one(OptionList)
        assert options.highlighted == 0
        await pilot.press(*"moon")
        await pilot.pause()
        assert screen.query_one(Input).value == "moon"
        prompt = str(options.get_option_at_index(0).prompt)
        assert "[moon]" in prompt  # the matched word, not swallowed as markup
        await pilot.press("enter")  # resumes the highlighted row
        await pilot.pause()
        assert app.session.conversation == 1


async def test_history_ids_are_aligned(make_app, tmp_path):
    h = _history_with(tmp_path, *[f"q{i}" for i in range(11)])
    app = make_app(history=h)
    async with app.run_test(size=(120, 35)) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        options = app.screen.query_one(OptionList)
        rows = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert len({row.index("20") for row in rows}) == 1  # the date column starts at one place


async def test_delete_in_history_asks_first(make_app, tmp_path):
    h = _history_with(tmp_path, "keep me", "and me")
    app = make_app(history=h)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        await pilot.press("ctrl+d")
        await pilot.pause()
        assert len(h.list()) == 2  # one press only arms it
        await pilot.press("ctrl+d")
        await pilot.pause()
        assert len(h.list()) == 1


async def test_markup_in_user_text_and_labels_is_shown_as_typed(make_app):
    app = make_app(max_tokens=2)
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "What is [b]bold[/b] and [red]?", fast=True)
        await idle(app, pilot)
        app.notify("file [base].toml")  # notices quote file names with brackets
        await pilot.pause()
        reply = replies(app)[-1]
        reply.set_label("role[x] · [b]×1")
        await pilot.pause()
        shown = str(reply.query_one(".message-label").render())
        assert "role[x] · [b]×1" in shown  # not eaten as markup
        note = [n for n in app._notifications if "[base].toml" in str(n.message)]
        assert note and note[0].markup is False


async def test_ctrl_y_copies_the_last_reply_from_the_input(make_app):
    app = make_app(max_tokens=4)
    copied = []
    app.copy_to_clipboard = copied.append
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "hi")
        await idle(app, pilot)
        assert isinstance(app.focused, PromptInput)
        await pilot.press("ctrl+y")
        await pilot.pause()
        assert copied == [replies(app)[-1].text]


async def test_auto_label_never_shows_the_previous_role_and_gives_the_reason(make_app, roles_dir, tmp_path):
    (roles_dir / "a.toml").write_text((roles_dir / "a.toml").read_text() + '\n[routing]\nkeywords = ["alpha"]\n')
    app = make_app(max_tokens=2)
    async with app.run_test(size=SIZE) as pilot:
        await app.switch(["b"])
        await app.switch(["auto"])
        labels = []
        real = ChatMessage.set_label

        def spy(self, label):
            labels.append(label)
            real(self, label)

        ChatMessage.set_label = spy
        try:
            await type_and_send(pilot, "tell me about alpha")
            await idle(app, pilot)
        finally:
            ChatMessage.set_label = real
        label = replies(app)[-1]._label
        assert label.startswith("auto → a") and not any(l.startswith("b") for l in labels)
        assert any("auto → a: keyword 'alpha'" in str(n.message) for n in app._notifications)


async def test_multiline_input_keeps_its_lines_and_ctx_follows_resume_and_new_chat(make_app, tmp_path):
    from edgelora.frontends.tui.widgets import StatusBar

    h = _history_with(tmp_path, "first line\nsecond line")
    app = make_app(history=h)
    async with app.run_test(size=(120, 35)) as pilot:
        await app.resume(1)
        await pilot.pause()
        user = [m for m in app.query(ChatMessage) if m.role == "user"][0]
        body = user.query_one(".message-body")
        assert "first line  \nsecond line" in body.source  # a hard break, not one joined line
        status = str(app.query_one(StatusBar).render())
        want = len(app.session.engine.render_chat(app.session.messages)[0])
        assert f"ctx {want}/" in status  # right after the resume, before any send
        await app.action_new_chat()
        await pilot.pause()
        assert "ctx 0/" in str(app.query_one(StatusBar).render())


# ------------------------------------------------------------------ discoverability (issue 21, item 5)


async def test_first_screen_welcomes_and_the_input_says_what_to_do(make_app):
    app = make_app(max_tokens=2)
    async with app.run_test(size=SIZE) as pilot:
        welcome = app.query_one("#welcome")
        assert "/help" in str(welcome.render()) and "Ctrl+R" in str(welcome.render())
        assert "/help" in app.query_one(PromptInput).placeholder
        await type_and_send(pilot, "hi")
        await idle(app, pilot)
        assert not app.query("#welcome")  # the conversation takes its place
        await app.action_new_chat()
        await pilot.pause()
        assert app.query("#welcome")


async def test_roles_panel_has_a_title_and_each_role_its_description(make_app):
    from edgelora.frontends.tui.widgets import RolesPanel

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        panel = app.query_one(RolesPanel)
        assert panel.border_title == "Roles"
        shown = {o.id: str(o.prompt) for o in panel._options}
        assert "test role a" in shown["a"] and "test role b" in shown["b"] and "The base model" in shown["base"]


async def test_palette_help_names_each_role_and_choosing_one_switches_to_it(make_app, clean_engine):
    """Each palette entry is bound to its own role (no late binding in the loop)."""
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause(0.5)
        await pilot.press(*"Role: ")
        await pilot.pause(0.5)
        options = app.screen.query_one(OptionList)
        entries = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        by_role = {e.split("\n")[0].removeprefix("Role: "): e for e in entries if e.startswith("Role: ")}
        assert set(by_role) == {"base", "a", "b", "auto"}
        assert all(f"'{name}'" in help_ for name, help_ in by_role.items())
        assert "test role a" in by_role["a"]
        await pilot.press(*"a")  # "Role: a" first
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert clean_engine.active == {"a": 1.0}


async def test_help_lists_the_slash_commands_and_the_keys(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "/help")
        console = Console(width=100)
        with console.capture() as capture:
            console.print(app.query_one(".help").content)
        shown = capture.get()
        for what in ("/role NAME", "/compare A B", "/history", "/export FILE.md", "ctrl+o", "ctrl+y", "escape"):
            assert what in shown
        assert not [n for n in app._notifications if n.severity == "error"]
        assert app.session.messages == []  # a note on the screen, not part of the conversation


async def test_ctrl_c_says_how_to_quit_in_plain_words(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        app.query_one("#roles").focus()
        await pilot.press("ctrl+c")
        await pilot.pause()
        (note,) = app._notifications
        assert "ctrl+q" in note.message.lower() and "[b]" not in note.message


async def test_notices_leave_the_input_and_status_bar_visible(make_app):
    from textual.widgets._toast import Toast

    app = make_app()
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        app.notify("a notice long enough to wrap over two or three lines of the toast on a small terminal")
        for _ in range(50):  # until the toast is laid out (slow on a busy machine)
            await pilot.pause(0.1)
            toasts = app.screen.query(Toast)
            if toasts and toasts.first().region.height:
                break
        (toast,) = app.screen.query(Toast)
        assert toast.region.height and toast.region.bottom <= app.query_one(PromptInput).region.y


async def test_at_80x24_status_bar_and_footer_fit(make_app):
    from textual.widgets import Footer
    from textual.widgets._footer import FooterKey

    from edgelora.frontends.tui.widgets import StatusBar

    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await type_and_send(pilot, "/mix a:0.5 b:0.5")
        app.last_speed = 118.0
        app.refresh_state()
        await pilot.pause()
        status = str(app.query_one(StatusBar).render())
        assert "a×0.5, b×0.5" in status and status.endswith("MB resident")
        footer = app.screen.query_one(Footer)
        keys = list(footer.query(FooterKey))
        assert keys and all(k.region.right <= footer.region.right and k.region.width >= len(k.description) + 2
                            for k in keys)
        assert not any(a.region.overlaps(b.region) for i, a in enumerate(keys) for b in keys[i + 1:])


async def _slash(pilot, text):
    pilot.app.query_one(PromptInput).load_text(text)
    await pilot.press("enter")
    await pilot.pause()


def _errors(app):
    return [n.message for n in app._notifications if n.severity == "error"]


async def test_export_writes_a_new_file_or_an_earlier_export_and_refuses_anything_else(make_app, tmp_path):
    h = _history_with(tmp_path, "What is the moon?")
    mine = tmp_path / "notes.md"
    mine.write_text("my own notes\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    out = tmp_path / "chat.md"
    app = make_app(history=h, resume=1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await _slash(pilot, f"/export {mine}")
        assert mine.read_text() == "my own notes\n"  # not replaced
        assert any(str(mine) in e and "not an earlier history export" in e for e in _errors(app))
        await _slash(pilot, f"/export {folder}")  # an OSError on main: the app crashed
        assert any(str(folder) in e and "folder" in e for e in _errors(app))
        await _slash(pilot, f"/export {out}")
        assert "What is the moon?" in out.read_text()
        h.add(1, "user", "And the sun?")
        await _slash(pilot, f"/export {out}")  # an earlier export is brought up to date
        assert "And the sun?" in out.read_text()
        assert len(_errors(app)) == 2
    assert app.return_code in (None, 0)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


async def test_ctrl_e_in_history_never_replaces_a_file_it_did_not_write(make_app, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    h = _history_with(tmp_path, "What is the moon?")
    (tmp_path / "conversation-1.md").write_text("someone's own file\n")
    app = make_app(history=h)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        await pilot.pause()
        await pilot.press("ctrl+e")
        await pilot.pause()
        h.add(1, "user", "And the sun?")
        await pilot.press("ctrl+e")  # again: the earlier export is replaced, not a third file made
        await pilot.pause()
        assert _errors(app) == []
    assert (tmp_path / "conversation-1.md").read_text() == "someone's own file\n"
    exported = (tmp_path / "conversation-1-2.md").read_text()
    assert "What is the moon?" in exported and "And the sun?" in exported
    assert not (tmp_path / "conversation-1-3.md").exists()
