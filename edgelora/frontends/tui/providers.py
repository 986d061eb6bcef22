"""Command palette provider: every role, to switch to it (plus compare and history)."""

from __future__ import annotations

from functools import partial

from rich.markup import escape
from textual.command import DiscoveryHit, Hit, Hits, Provider

from edgelora.frontends.tui.widgets import role_description


class RolesProvider(Provider):
    def _commands(self):
        app = self.app
        names = ["base", *app.roles.catalog.names(), "auto"]
        for name in names:  # partial binds each role now (a lambda in this loop would see the last name)
            about = role_description(app.roles, name)
            help_text = f"Answer as '{name}' from the next reply on" + (f": {about}" if about else "")
            yield f"Role: {name}", partial(app.switch, [name]), escape(help_text)
        yield "History: browse conversations", app.action_history, "Resume, search, delete, export"
        yield "New conversation", app.action_new_chat, "Start over (the current one stays in the history)"

    async def discover(self) -> Hits:
        for title, callback, help_text in self._commands():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, callback, help_text in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
