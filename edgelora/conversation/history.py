"""Conversations in SQLite (the user data folder), searchable with FTS5.

Each message is written in its own transaction as soon as it exists, so a killed process loses at
most the reply being generated."""

from __future__ import annotations

import functools
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from edgelora.config import data_dir
from edgelora.convert.errors import ConvertError
from edgelora.convert.outputs import atomic_output, check_target
from edgelora.errors import EdgeloraError

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id);
CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5(content, content='messages', content_rowid='id');
CREATE TRIGGER IF NOT EXISTS messages_ai AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_ad AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content);
END;
"""


class HistoryError(EdgeloraError):
    pass


@dataclass
class Conversation:
    id: int
    title: str
    created: float
    updated: float
    n_messages: int = 0
    label: str = ""  # the last answer's label ('pirate · pirate×1 · 120 tok/s'); '' before any answer


@dataclass
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    label: str
    created: float

    def as_chat(self) -> dict:
        return {"role": self.role, "content": self.content}


def default_db() -> Path:
    return data_dir() / "history.sqlite3"


EXPORT_MARK = "<!-- edgelora history export -->"  # first line of a file `history export -o` wrote
SQLITE_MAX_ID = 2**63 - 1  # larger ids cannot be a row: SQLite integers are 64-bit

LOCK_WAIT_S = 10.0  # another process writing: wait this long for it, then give up with a clear error


def _guarded(method):
    """sqlite3 errors (corrupt file, lock held too long, read-only disk) become one-line HistoryErrors."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise HistoryError(f"history {self.path}: {exc}") from None
    return wrapper


class History:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_db()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and not self.path.is_file():
                raise HistoryError(f"history {self.path}: not a regular file; move it away")
            # autocommit mode: every statement is its own transaction
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=LOCK_WAIT_S)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise HistoryError(f"history {self.path} is unusable ({exc}); move it away to start a new one") from None
        except OSError as exc:
            raise HistoryError(f"history folder {self.path.parent}: {exc.strerror}") from None

    def close(self) -> None:
        self.db.close()

    @_guarded
    def new(self, title: str = "") -> int:
        now = time.time()
        return self.db.execute("INSERT INTO conversations(title, created, updated) VALUES (?, ?, ?)",
                               (title, now, now)).lastrowid

    @_guarded
    def add(self, conversation_id: int, role: str, content: str, label: str = "") -> int:
        now = time.time()
        with self.db:  # one transaction: the message and the conversation's timestamp
            self.db.execute("BEGIN")
            mid = self.db.execute(
                "INSERT INTO messages(conversation_id, role, content, label, created) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, label, now),
            ).lastrowid
            self.db.execute("UPDATE conversations SET updated = ?, title = CASE WHEN title = '' AND ? = 'user' "
                            "THEN substr(?, 1, 60) ELSE title END WHERE id = ?", (now, role, content, conversation_id))
        return mid

    @_guarded
    def list(self, limit: int = 50) -> list[Conversation]:
        rows = self.db.execute(
            "SELECT c.*, (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id) AS n, "
            "(SELECT label FROM messages m WHERE m.conversation_id = c.id AND m.role = 'assistant' "
            "ORDER BY m.id DESC LIMIT 1) AS label "
            "FROM conversations c ORDER BY updated DESC, id DESC LIMIT ?", (limit,)).fetchall()
        return [Conversation(r["id"], r["title"], r["created"], r["updated"], r["n"], r["label"] or "") for r in rows]

    def latest(self) -> Conversation | None:
        found = self.list(1)
        return found[0] if found else None

    @_guarded
    def get(self, conversation_id: int) -> Conversation:
        if not -SQLITE_MAX_ID <= conversation_id <= SQLITE_MAX_ID:  # sqlite3 raises OverflowError on these
            raise HistoryError(f"no conversation {conversation_id} in {self.path}")
        r = self.db.execute("SELECT * FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        if r is None:
            raise HistoryError(f"no conversation {conversation_id} in {self.path}")
        return Conversation(r["id"], r["title"], r["created"], r["updated"])

    @_guarded
    def messages(self, conversation_id: int) -> list[Message]:
        self.get(conversation_id)
        rows = self.db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [Message(**dict(r)) for r in rows]

    @_guarded
    def rename(self, conversation_id: int, title: str) -> None:
        self.get(conversation_id)
        self.db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, conversation_id))

    @_guarded
    def delete(self, conversation_id: int) -> None:
        self.get(conversation_id)
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("DELETE FROM messages WHERE conversation_id = ?", (conversation_id,))
            self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    @_guarded
    def search(self, query: str, limit: int = 50) -> list[tuple[Message, str]]:
        """Full-text search; returns (message, snippet) best first."""
        try:
            rows = self.db.execute(
                "SELECT m.*, snippet(messages_fts, 0, '[', ']', '…', 12) AS snip FROM messages_fts "
                "JOIN messages m ON m.id = messages_fts.rowid WHERE messages_fts MATCH ? ORDER BY rank LIMIT ?",
                (query, limit)).fetchall()
        except sqlite3.OperationalError as exc:
            raise HistoryError(f"search {query!r}: {exc}") from None
        return [(Message(**{k: r[k] for k in r.keys() if k != "snip"}), r["snip"]) for r in rows]

    @_guarded
    def export_markdown(self, conversation_id: int) -> str:
        conv = self.get(conversation_id)
        out = [f"# {conv.title or f'Conversation {conv.id}'}", ""]
        for m in self.messages(conversation_id):
            who = {"user": "You", "assistant": "Assistant", "system": "System"}.get(m.role, m.role)
            label = f" ({m.label})" if m.label else ""
            out += [f"**{who}**{label}:", "", m.content, ""]
        return "\n".join(out)

    def write_export(self, conversation_id: int, out: Path, *, force: bool = False, protected=(),
                     flag: str = "-o") -> Path:
        """The conversation as Markdown in ``out``, written atomically. Only an earlier export is
        replaced without ``force``; the history database and ``protected`` (path, what) never are.
        ``flag`` names where ``out`` came from in errors ('-o', '/export')."""
        text = self.export_markdown(conversation_id)
        mine = [(self.path.with_name(self.path.name + suffix), "the history database") for suffix in ("", "-wal", "-shm")]
        try:
            check_target(out, flag, is_ours=is_history_export, ours="an earlier history export", force=force,
                         protected=[*mine, *protected])
            with atomic_output(out, flag) as tmp:
                tmp.write_text(f"{EXPORT_MARK}\n{text}\n", "utf-8")
        except ConvertError as exc:
            raise HistoryError(str(exc)) from None
        return out


def is_history_export(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(EXPORT_MARK)).decode("utf-8", "replace") == EXPORT_MARK
    except OSError:
        return False
