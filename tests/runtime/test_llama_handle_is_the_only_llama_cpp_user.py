"""runtime/llama.py is the only code that talks to llama-cpp-python: a release that renames one of
its internals breaks one file, not two dozen touches spread over the engine, the probes and the UI."""

from __future__ import annotations

import ast
from pathlib import Path

import edgelora

PACKAGE = Path(edgelora.__file__).parent
HANDLE = PACKAGE / "runtime" / "llama.py"
# Private attributes of llama-cpp-python's Llama / LlamaModel / LlamaContext that edgelora used to reach into.
PRIVATE = {"_model", "_ctx", "input_ids", "_requires_eval", "_input_ids", "_batch", "_sampler", "_stack", "_environment"}


def _sources():
    files = sorted(p for p in PACKAGE.rglob("*.py") if p != HANDLE)
    assert len(files) > 50  # the whole package is looked at, not an empty glob
    for path in files:
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text(), str(path))


def test_no_module_but_the_handle_imports_llama_cpp_not_even_inside_a_function():
    found = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{name}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] == "llama_cpp"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llama_cpp":
                found.append(f"{name}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "import_module", "__import__") and any(
                    isinstance(a, ast.Constant) and str(a.value).startswith("llama_cpp") for a in node.args):
                found.append(f"{name}:{node.lineno} dynamic import of llama_cpp")
    assert found == [], "only edgelora/runtime/llama.py may import llama_cpp:\n" + "\n".join(found)


def test_nothing_outside_the_handle_touches_a_private_attribute_of_llama_cpp_python():
    found = [f"{name}:{node.lineno} .{node.attr}" for name, tree in _sources() for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and node.attr in PRIVATE]
    # writing the Llama's token count (``llama.n_tokens = n``) is the other way to corrupt its state
    found += [f"{name}:{node.lineno} .n_tokens written" for name, tree in _sources() for node in ast.walk(tree)
              if isinstance(node, (ast.Assign, ast.AugAssign)) for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
              if isinstance(target, ast.Attribute) and target.attr == "n_tokens"]
    assert found == [], "only edgelora/runtime/llama.py may reach into llama-cpp-python:\n" + "\n".join(found)


def test_the_handle_itself_is_what_imports_llama_cpp():
    """The check above would pass vacuously if llama.cpp were reached some other way: the handle does it."""
    tree = ast.parse(HANDLE.read_text())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert "llama_cpp" in imported
