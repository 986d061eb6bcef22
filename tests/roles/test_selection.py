"""The one grammar of a role selection (roles/selection.py): parsed once into one typed value, the
canonical spec given back by str(), every bad spec refused with one SelectionError. No model."""

from __future__ import annotations

import pytest

from edgelora.errors import RoleError, SelectionError
from edgelora.roles.selection import Selection, parse_adapter_spec, parse_selection, with_names


@pytest.mark.parametrize("text, items, canonical", [
    ("pirate", (("pirate", 1.0),), "pirate"),
    ("pirate:0.7", (("pirate", 0.7),), "pirate:0.7"),
    ("pirate:0.7+terse:0.3", (("pirate", 0.7), ("terse", 0.3)), "pirate:0.7+terse:0.3"),
    (" pirate + terse:1e0 ", (("pirate", 1.0), ("terse", 1.0)), "pirate+terse"),
    ("pirate:-0.5", (("pirate", -0.5),), "pirate:-0.5"),
    ("auto", (("auto", 1.0),), "auto"),
    ("base", (("base", 1.0),), "base"),
    ("./roles/x.toml", (("./roles/x.toml", 1.0),), "./roles/x.toml"),
    ("x.toml:0.5", (("x.toml", 0.5),), "x.toml:0.5"),
    ("./a:b/x.toml", (("./a:b/x.toml", 1.0),), "./a:b/x.toml"),  # a ':' in a folder name is no weight
    ("pirate:1e+30+terse", (("pirate", 1e30), ("terse", 1.0)), "pirate:1e30+terse"),  # an exponent's '+' joins nothing
])
def test_a_spec_parses_into_items_and_prints_back_canonically(text, items, canonical):
    selection = parse_selection(text)
    assert selection.items == items
    assert str(selection) == canonical
    assert parse_selection(str(selection)) == selection  # what the history stores reads back the same


def test_repeated_flags_stack_as_one_selection_and_nothing_given_is_the_base():
    assert parse_selection(["pirate:0.7", "terse:0.3"]) == parse_selection("pirate:0.7+terse:0.3")
    assert parse_selection([]) == Selection() and str(Selection()) == "base"
    assert parse_selection("auto").is_auto and not parse_selection("pirate").is_auto


@pytest.mark.parametrize("text, words", [
    ("a+a", "role 'a' is given twice"),
    ("pirate:1e0+pirate", "role 'pirate' is given twice"),
    ("auto+pirate", "'auto' picks one role per prompt; it cannot be stacked"),
    ("auto:0.5", "'auto' takes no weight"),
    ("pirate:abc", "the weight after ':' must be a finite number"),
    ("pirate:nan", "the weight after ':' must be a finite number"),
    ("pirate:-inf+terse", "(in 'pirate:-inf') must be a finite number"),
    ("a+", "an empty role name"),
    (":0.5", "an empty role name"),
])
def test_a_bad_spec_is_one_typed_error_naming_the_spec(text, words):
    with pytest.raises(SelectionError) as info:
        parse_selection(text)
    message = str(info.value)
    assert message.startswith(f"role '{text}': ") and words in message and "\n" not in message
    assert isinstance(info.value, RoleError)  # the server's 400 with param 'model', the CLI's exit 2


def test_a_manifest_path_and_its_roles_name_are_the_same_role_twice():
    selection = parse_selection("./mine/halfterse.toml:-0.5+halfterse")
    with pytest.raises(SelectionError, match="role 'halfterse' is given twice"):
        with_names(selection, lambda path: "halfterse")
    assert str(with_names(parse_selection("./mine/halfterse.toml:-0.5"), lambda path: "halfterse")) == "halfterse:-0.5"


def test_an_adapter_spec_is_a_file_with_an_optional_scale():
    assert parse_adapter_spec("a.gguf:0.5") == ("a.gguf", 0.5)
    assert parse_adapter_spec("dir:x/a.gguf") == ("dir:x/a.gguf", 1.0)
