"""Adding and removing roles in the user's roles folder, atomically: adapter files first, the
manifest last (a role appears whole or not at all), the manifest first on removal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgelora.convert.outputs import atomic_output
from edgelora.files import sha256_file
from edgelora.roles.manifest import Role, RoleError, load_manifest
from edgelora.safety.signing import sig_path


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def _atomic_text(dst: Path, text: str) -> None:
    with atomic_output(dst) as tmp:
        tmp.write_text(text, "utf-8")


def manifest_text(role: Role, files: dict[Path, str]) -> str:
    """TOML for a role; ``files`` maps each adapter's path to the name written in the manifest."""
    def q(value):  # TOML basic strings accept JSON's escapes; non-ASCII stays UTF-8 (TOML has no surrogates)
        return json.dumps(value, ensure_ascii=False)

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


MAX_NAME_BYTES = 200  # the role's folder, manifest and their temp files must fit a file name (255 bytes)


def install_role(role: Role, roles_dir: Path) -> Path:
    """Copy the role's adapters (and signatures), then write its manifest, then read it back: a
    role that would not load as written is removed again and refused."""
    if len(role.name.encode()) > MAX_NAME_BYTES:
        raise RoleError(f"{role.path}: name is {len(role.name.encode())} bytes long; a role name may have "
                        f"at most {MAX_NAME_BYTES}")
    try:
        return _install(role, roles_dir)
    except OSError as exc:  # read-only or full disk, a file name too long
        raise RoleError(f"cannot add role '{role.name}' to {roles_dir}: {exc.strerror or exc}"
                        + (f" ({exc.filename})" if exc.filename else "")) from None


def place_taken(name: str, roles_dir: Path, replaces: Path | None = None) -> str | None:
    """Why roles_dir/NAME.toml and roles_dir/NAME cannot be (re)written for role NAME, or None.
    Only a manifest of a role named NAME (``replaces``, when given) and its folder may be replaced:
    a file of the user's own (another name inside, a broken manifest, a stray folder) never is."""
    folder, manifest = roles_dir / name, roles_dir / f"{name}.toml"
    ours = False
    if manifest.exists() or manifest.is_symlink():
        try:
            ours = load_manifest(manifest).name == name
        except RoleError:
            ours = False
        if replaces is not None:
            ours = ours and manifest.resolve() == replaces.resolve()
        if not ours:
            return f"{manifest} exists and is not role '{name}' (another name inside, or it does not load)"
    elif replaces is not None:
        ours = replaces.resolve().parent == roles_dir.resolve()  # roles_dir/other.toml naming NAME owns roles_dir/NAME
    if (folder.exists() or folder.is_symlink()) and not (ours and folder.is_dir() and not folder.is_symlink()):
        return f"{folder} exists and belongs to no role"
    return None


def _install(role: Role, roles_dir: Path) -> Path:
    folder = roles_dir / role.name
    manifest = roles_dir / f"{role.name}.toml"
    if roles_dir.exists() and not roles_dir.is_dir():
        raise RoleError(f"{roles_dir} exists and is not a folder; move it away to add role '{role.name}'")
    taken = place_taken(role.name, roles_dir)
    if taken:
        raise RoleError(f"{taken}; move it away to add role '{role.name}'")
    roles_dir.mkdir(parents=True, exist_ok=True)
    folder.mkdir(exist_ok=True)
    files, names = {}, set()
    for i, a in enumerate(role.adapters):
        name = a.file.name if a.file.name not in names else f"{i}-{a.file.name}"  # two adapters, one file name
        names.add(name)
        _atomic_copy(a.file, folder / name)
        if sig_path(a.file).is_file():
            _atomic_copy(sig_path(a.file), sig_path(folder / name))
        files[a.file] = f"{role.name}/{name}"
    _atomic_text(manifest, manifest_text(role, files))
    try:
        written = load_manifest(manifest)
        if [(a.sha256, a.scale) for a in written.adapters] != [(a.sha256, a.scale) for a in role.adapters]:
            raise RoleError(f"{manifest}: the written manifest does not pin the same adapters")
        for a in written.adapters:
            if sha256_file(a.file) != a.sha256:
                raise RoleError(f"{a.file}: the copied adapter does not match its pin")
    except RoleError:
        remove_role(written if "written" in locals() else role, manifest=manifest)
        raise
    return manifest


def remove_role(role: Role, manifest: Path | None = None) -> None:
    manifest = manifest or role.path
    assert manifest is not None
    manifest.unlink(missing_ok=True)
    folder = manifest.parent / role.name
    if folder.is_dir():
        shutil.rmtree(folder)
