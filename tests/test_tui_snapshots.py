"""Snapshot tests of the layout at 80x24 (pytest-textual-snapshot). Content is made deterministic:
a saved conversation with fixed labels; the compare view runs on a scripted session (a layout
test: the behaviour of compare itself is tested on the real engine in test_tui.py)."""

from __future__ import annotations

import pytest

from edgelora import Engine
from edgelora.conversation.chat import ChatSession, Reply
from edgelora.config import Config
from edgelora.conversation.history import History
from edgelora.roles.manifest import RoleCatalog
from edgelora.roles.session import Roles
from edgelora.frontends.tui.app import EdgeloraApp
from edgelora.frontends.tui.screens import CompareScreen

from .conftest import write_role

SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 35)], ids=["80x24", "120x35"])


@pytest.fixture(scope="module")
def fresh_engine(smol_path):
    eng = Engine(smol_path, n_ctx=1024)
    yield eng
    eng.close()


@pytest.fixture
def app(fresh_engine, tmp_path, smol_adapters):
    d = tmp_path / "roles"
    for name in ("pirate", "terse"):
        write_role(d, name, smol_adapters["a" if name == "pirate" else "b"])
    history = History(tmp_path / "h.sqlite3")
    cid = history.new()
    history.add(cid, "user", "What is a lighthouse?")
    history.add(cid, "assistant", "A **lighthouse** is a tower with a bright lamp that guides ships.",
                label="base · no adapter · 120 tok/s")
    history.add(cid, "user", "Say it like a pirate.")
    history.add(cid, "assistant", "Arr, matey! A lighthouse be a tower that guides yer ship. Yo ho ho!",
                label="pirate · pirate×1 · 118 tok/s")
    history.db.execute("UPDATE conversations SET created = 1790000000, updated = 1790000000")  # fixed dates
    roles = Roles(fresh_engine, Config(), catalog=RoleCatalog([d]))
    roles.use("pirate")
    return EdgeloraApp(ChatSession(roles, history, temperature=0.0), resume=cid)


@SIZES
def test_main_screen(app, snap_compare, size):
    assert snap_compare(app, terminal_size=size)


@SIZES
def test_history_screen(app, snap_compare, size):
    async def open_history(pilot):
        await pilot.press("ctrl+o")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=open_history)


@SIZES
def test_roles_panel_focused(app, snap_compare, size):
    async def focus_roles(pilot):
        await pilot.press("ctrl+r")
        await pilot.press("down")
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=focus_roles)


class ScriptedSession:
    """Stands in for ChatSession in the compare view's layout test: fixed answers per role."""

    ANSWERS = {"pirate": "Arr! A lighthouse be a tall tower.", "terse": "A tower with a light."}

    def __init__(self, roles):
        self.roles = roles
        self.engine = roles.engine
        self._role = None

    def start_reply(self):
        return Reply(self._role, [{"name": self._role, "scale": 1.0}])

    def stream_reply(self, reply, messages=None):
        yield from self.ANSWERS[reply.role].split(" ")[:1]
        yield " " + " ".join(self.ANSWERS[reply.role].split(" ")[1:])


class ScriptedRoles:
    def __init__(self, roles, session_ref):
        self._roles, self._ref = roles, session_ref
        self.engine = roles.engine
        self.specs = ["base"]

    def use(self, specs):
        self._ref[0]._role = specs[0]


@SIZES
def test_compare_view(app, snap_compare, size):
    async def open_compare(pilot):
        ref = [None]
        session = ScriptedSession(ScriptedRoles(app.roles, ref))
        ref[0] = session
        screen = CompareScreen(session, [{"role": "user", "content": "What is a lighthouse?"}], "pirate", "terse")
        await pilot.app.push_screen(screen)
        await screen._worker.wait()
        await pilot.pause()

    assert snap_compare(app, terminal_size=size, run_before=open_compare)
