"""The one grammar of a role selection, parsed in one place into one typed value.

    name            a role at weight 1          pirate
    name:W          a role at weight W          pirate:0.7
    a+b             roles stacked               pirate:0.7+terse:0.3
    ./x.toml[:W]    the role a manifest defines ./roles/x.toml, x.toml:0.5
    base            the base model, no adapter
    auto            a role chosen per prompt    (alone only, no weight)

`ask --role` (its repeated flags stack), the TUI's /role and /mix, the server's ``model`` field,
`export ROLE...` and the history all go through ``parse_selection``: the same text means the same
thing everywhere and is refused with the same message (a SelectionError)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from edgelora.errors import SelectionError

AUTO = "auto"
BASE = "base"


def is_manifest_path(name: str) -> bool:
    return name.endswith(".toml")


@dataclass(frozen=True)
class Selection:
    """Roles (names or manifest paths) with weights, or 'auto'. ``str()`` gives the canonical spec back."""

    items: tuple[tuple[str, float], ...] = ((BASE, 1.0),)

    @property
    def is_auto(self) -> bool:
        return self.items == ((AUTO, 1.0),)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.items]

    @property
    def specs(self) -> list[str]:
        """One 'name[:W]' per role, as the repeatable flags take them."""
        return [name if weight == 1.0 else f"{name}:{_weight(weight)}" for name, weight in self.items]

    @property
    def manifests(self) -> list[str]:
        return [name for name in self.names if is_manifest_path(name)]

    def __str__(self) -> str:
        return "+".join(self.specs)


_STACK_PLUS = re.compile(r"\+(?<![0-9][eE]\+)|\+(?![0-9])")  # a '+' joins roles; in 'a:1e+30' it is an exponent's


def _weight(weight: float) -> str:
    return f"{weight:g}".replace("e+", "e")  # 1e+30 -> 1e30: no '+' inside a stack's part


def parse_selection(text: str | Sequence[str] | Selection) -> Selection:
    """'a:0.7+b' (or ['a:0.7', 'b'], each part may stack too) -> Selection. Nothing given is the base.
    A part ending in .toml is a manifest path, whole: a ':' in its folders (./a:b/x.toml) is no weight."""
    if isinstance(text, Selection):
        return text
    given = [text] if isinstance(text, str) else list(text)
    spec = "+".join(given)
    if not given:
        return Selection()
    items = []
    for part in _STACK_PLUS.split(spec):
        part = part.strip()
        if not part:
            raise SelectionError(f"role '{spec}': an empty role name (write a, a:0.5 or a:0.7+b:0.3)")
        items.append(_item(part, spec))
    names = [name for name, _ in items]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SelectionError(duplicate_message(spec, dup))
    if AUTO in names:
        if len(items) > 1:
            raise SelectionError(f"role '{spec}': 'auto' picks one role per prompt; it cannot be stacked")
        if items[0][1] != 1.0 or ":" in spec:
            raise SelectionError(f"role '{spec}': 'auto' takes no weight")
    return Selection(tuple(items))


def with_names(selection: Selection, name_of) -> Selection:
    """The selection with each manifest path replaced by the name of the role it defines
    (``name_of(path)``); a role given both ways is given twice."""
    items = tuple((name_of(n) if is_manifest_path(n) else n, w) for n, w in selection.items)
    names = [n for n, _ in items]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise SelectionError(duplicate_message(str(selection), dup))
    return Selection(items)


def duplicate_message(spec: str, name: str) -> str:
    """A role given twice would have its weight summed past what was asked."""
    return f"role '{spec}': role '{name}' is given twice; give it once with its weight (e.g. {name}:0.5)"


def _item(part: str, spec: str) -> tuple[str, float]:
    if is_manifest_path(part):
        return part, 1.0
    name, sep, weight = part.rpartition(":")
    if not sep:
        return part, 1.0
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not name.strip():
        raise SelectionError(f"role '{spec}': an empty role name before ':'")
    if not math.isfinite(value):
        where = "" if part == spec else f" (in '{part}')"
        raise SelectionError(f"role '{spec}': the weight after ':'{where} must be a finite number")
    return name.strip(), value


def parse_role_weight(spec: str) -> tuple[str, float]:
    """One 'name[:W]' (a manifest's ``include`` entry)."""
    selection = parse_selection(spec)
    if len(selection.items) != 1:
        raise SelectionError(f"role '{spec}': one role here, not a stack")
    return selection.items[0]


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """`ask --adapter PATH[:SCALE]` (a file, not a role): a suffix that is not a number belongs to the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0
