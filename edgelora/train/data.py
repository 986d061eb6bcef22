"""Training examples for `edgelora roles train`: JSONL or TOML of {prompt, answer[, system]} pairs.

Standard library only: every problem is one line naming the file and the line (or entry), found
before torch is imported.

JSONL: one object per line, {"prompt": ..., "answer": ..., "system": ...(optional)}; blank lines skip.
TOML:  an optional top-level `system = "..."` for every pair, then [[examples]] tables with the same keys.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from edgelora._toml import tomllib
from edgelora.errors import EdgeloraError

KEYS = {"prompt", "answer", "system"}
MIN_TRAIN = 4  # pairs left for training after the held-out ones
MAX_FILE_BYTES = 64 << 20


class TrainDataError(EdgeloraError):
    """A training data file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    prompt: str
    answer: str
    system: str | None
    where: str  # "FILE:LINE" or "FILE:LINE (examples[N])", for errors found later (too long)

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, {"role": "user", "content": self.prompt}]


@dataclass
class Examples:
    path: Path
    pairs: list[Pair]
    system: str | None  # the file's own system prompt (TOML), which the role keeps


def load_examples(path: str | Path) -> Examples:
    path = Path(path).expanduser()
    try:
        if not path.is_file():
            raise TrainDataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TrainDataError(f"{path}: over {MAX_FILE_BYTES >> 20} MB; not a file of examples")
        text = path.read_text("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TrainDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TrainDataError(f"{path}: cannot read ({exc.strerror})") from None
    if path.suffix.lower() == ".toml":
        examples = _from_toml(path, text)
    else:
        examples = Examples(path, _from_jsonl(path, text), None)
    if not examples.pairs:
        raise TrainDataError(f"{path}: no examples")
    return examples


def _from_jsonl(path: Path, text: str) -> list[Pair]:
    pairs = []
    # Only "\n" ends a line: splitlines() would also break at U+2028, U+2029 and U+0085, which JSON
    # strings may hold raw, refusing a valid file and shifting the line numbers after them.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise TrainDataError(f"{where}: not a JSON object ({exc.msg}); one {{\"prompt\", \"answer\"}} object per line") from None
        except RecursionError:
            raise TrainDataError(f"{where}: nested too deeply; one {{\"prompt\", \"answer\"}} object per line") from None
        pairs.append(_pair(entry, where, None))
    return pairs


def _from_toml(path: Path, text: str) -> Examples:
    try:
        data = tomllib.loads(text)
    except ValueError as exc:
        raise TrainDataError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(data) - {"system", "examples"}
    if unknown:
        raise TrainDataError(f"{path}: unknown key '{sorted(unknown)[0]}' (known: system, examples)")
    system = data.get("system")
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise TrainDataError(f"{path}: 'system' must be a non-empty string")
    entries = data.get("examples", [])
    if not isinstance(entries, list):
        raise TrainDataError(f"{path}: 'examples' must be an array of tables ([[examples]])")
    lines = _example_lines(text)
    lines = lines if len(lines) == len(entries) else []  # inline tables, or a header inside a string
    pairs = [_pair(e, _toml_where(path, lines, i), system) for i, e in enumerate(entries)]
    return Examples(path, pairs, system)


def _example_lines(text: str) -> list[int]:
    """The line number of each `[[examples]]` header, in order (a header inside a multi-line string
    could shift them; then the entry's number still names it)."""
    return [n for n, line in enumerate(text.split("\n"), 1)
            if re.fullmatch(r"\s*\[\[\s*examples\s*\]\]\s*(#.*)?", line.rstrip("\r"))]


def _toml_where(path: Path, lines: list[int], i: int) -> str:
    return f"{path}:{lines[i]} (examples[{i + 1}])" if i < len(lines) else f"{path}: examples[{i + 1}]"


def shared_system(pairs: list[Pair]) -> tuple[str | None, bool]:
    """(the system prompt every pair was trained with, or None; whether the pairs differ in it):
    the role sends that prompt, so it meets what training showed it."""
    systems = {p.system for p in pairs}
    return (next(iter(systems)), False) if len(systems) == 1 else (None, True)


def _pair(entry, where: str, system: str | None) -> Pair:
    if not isinstance(entry, dict):
        raise TrainDataError(f"{where}: must be an object with 'prompt' and 'answer', got {type(entry).__name__}")
    unknown = set(entry) - KEYS
    if unknown:
        raise TrainDataError(f"{where}: unknown key '{sorted(unknown)[0]}' (known: prompt, answer, system)")
    for key in ("prompt", "answer"):
        if key not in entry:
            raise TrainDataError(f"{where}: missing key '{key}'")
    for key in KEYS & set(entry):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise TrainDataError(f"{where}: '{key}' must be a non-empty string")
    return Pair(entry["prompt"], entry["answer"], entry.get("system", system), where)


def split(examples: Examples, n_eval: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs): the held-out ones drawn by the seed, kept in file order."""
    pairs = examples.pairs
    if n_eval < 0:
        raise TrainDataError(f"--eval {n_eval}: must be 0 or more")
    if len(pairs) - n_eval < MIN_TRAIN:
        raise TrainDataError(f"{examples.path}: {len(pairs)} examples are too few to hold out {n_eval} and train on "
                             f"at least {MIN_TRAIN} (add examples or lower --eval)")
    held = set(random.Random(seed).sample(range(len(pairs)), n_eval))
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def encode(engine, messages: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt tokens from the model's own chat template, answer tokens + end of turn): the loss
    is taken on the second part only."""
    prompt_ids, _ = engine.render_chat(messages)
    return prompt_ids, engine.tokenize(answer, add_bos=False) + [engine.llama.token_eos()]
