"""Adding and removing roles in the user's roles folder, atomically: adapter files first, the
manifest last (a role appears whole or not at all), the manifest first on removal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .roles import Role
from .signing import sig_path


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _atomic_text(dst: Path, text: str) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, dst)


def manifest_text(role: Role, files: dict[Path, str]) -> str:
    """TOML for a role; ``files`` maps each adapter's path to the name written in the manifest."""
    q = json.dumps  # TOML basic strings accept JSON's escapes
    lines = [f"name = {q(role.name)}", f"description = {q(role.description)}"]
    if role.system:
        lines.append(f"system = {q(role.system)}")
    if role.include:
        lines.append(f"include = {q([f'{n}:{w:g}' for n, w in role.include])}")
    for a in role.adapters:
        lines += ["", "[[adapters]]", f"file = {q(files[a.file])}", f"sha256 = {q(a.sha256)}", f"scale = {a.scale!r}"]
    if role.base_architecture or role.base_sha256:
        lines += ["", "[base]"]
        lines += [f"architecture = {q(role.base_architecture)}"] if role.base_architecture else []
        lines += [f"sha256 = {q(role.base_sha256)}"] if role.base_sha256 else []
    if role.sampling:
        lines += ["", "[sampling]", *(f"{k} = {v!r}" for k, v in role.sampling.items())]
    if role.keywords or role.regex or role.examples:
        lines += ["", "[routing]", f"keywords = {q(role.keywords)}", f"regex = {q(role.regex)}", f"examples = {q(role.examples)}"]
    return "\n".join(lines) + "\n"


def install_role(role: Role, roles_dir: Path) -> Path:
    roles_dir.mkdir(parents=True, exist_ok=True)
    folder = roles_dir / role.name
    folder.mkdir(exist_ok=True)
    files = {}
    for a in role.adapters:
        _atomic_copy(a.file, folder / a.file.name)
        if sig_path(a.file).exists():
            _atomic_copy(sig_path(a.file), sig_path(folder / a.file.name))
        files[a.file] = f"{role.name}/{a.file.name}"
    manifest = roles_dir / f"{role.name}.toml"
    _atomic_text(manifest, manifest_text(role, files))
    return manifest


def remove_role(role: Role) -> None:
    assert role.path is not None
    role.path.unlink()
    folder = role.path.parent / role.name
    if folder.is_dir():
        shutil.rmtree(folder)
