"""Read a Hugging Face PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) with
numpy, and refuse what a GGUF LoRA cannot express, saying why and what to do."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex
from safetensors import safe_open

from .errors import ConvertError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"

# "<prefix>.<module>.<kind>[.<adapter name>][.weight]"
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<adapter>[A-Za-z0-9_-]+?))?(?:\.weight)?$"
)


@dataclass
class LoraModule:
    """One adapted module, in PEFT's orientation: a (r, n_in), b (n_out, r); for an embedding
    a is lora_embedding_A (r, vocab) and b is lora_embedding_B (dim, r)."""

    module: str  # e.g. "model.layers.0.self_attn.q_proj"
    embedding: bool
    a: np.ndarray
    b: np.ndarray
    rank: int
    alpha: float
    scaling: float  # what PEFT multiplies B·A by


@dataclass
class PeftSource:
    path: Path
    config: dict
    config_sha256: str
    weights_sha256: str
    modules: list[LoraModule]

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or ""

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    def default_scaling(self) -> tuple[int, float, float]:
        """(r, lora_alpha, scaling) of the config's defaults."""
        r, alpha = int(self.config["r"]), float(self.config["lora_alpha"])
        return r, alpha, peft_scaling(r, alpha, self.use_rslora)

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules)


MAX_ALPHA = 1e5  # beyond this the folded weights overflow f16 (and no trained LoRA uses it)


def peft_scaling(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# rank_pattern/alpha_pattern come from downloaded files: matched with a time limit, like routing
# rules (router.py), since a backtracking pattern would hang the conversion.
PATTERN_BUDGET_S = 0.5


def pattern_value(patterns: dict, key: str, default, field: str = "rank_pattern/alpha_pattern"):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", key)."""
    for p in patterns:
        try:
            hit = regex.match(rf"(.*\.)?({p})$", key, timeout=PATTERN_BUDGET_S)
        except regex.error as exc:
            raise ConvertError(f"{field} pattern {p!r} is not a valid regular expression ({exc})") from None
        except TimeoutError:
            raise ConvertError(f"{field} pattern {p!r} took over {PATTERN_BUDGET_S:g} s matching {key!r} "
                               "(catastrophic backtracking?); simplify it") from None
        if hit:
            return patterns[p]
    return default


def read_peft(folder: str | Path) -> PeftSource:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder (expected a PEFT adapter folder with {CONFIG} and {WEIGHTS})")
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    if not config_path.is_file():
        raise ConvertError(f"{folder}: no {CONFIG}; is this a PEFT LoRA folder?")
    if not weights_path.is_file():
        if (folder / PICKLE).is_file():
            raise ConvertError(
                f"{folder / PICKLE} is a pickle, which edgelora never loads (it can run code). Re-save it as "
                f"safetensors where you trained it: PeftModel.from_pretrained(base, '{folder}')"
                f".save_pretrained('{folder}', safe_serialization=True)"
            )
        raise ConvertError(f"{folder}: no {WEIGHTS}")
    raw = config_path.read_bytes()
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ConvertError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: must be a JSON object, got {type(config).__name__}")
    _check_config(config, config_path)
    tensors = _load_tensors(weights_path)
    modules = _pair_modules(tensors, config, weights_path)
    return PeftSource(
        path=folder,
        config=config,
        config_sha256=hashlib.sha256(raw).hexdigest(),
        weights_sha256=sha256_file(weights_path),
        modules=modules,
    )


def _check_config(config: dict, path: Path) -> None:
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ConvertError(f"{path}: peft_type is {kind}; only LORA adapters convert to GGUF LoRA")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConvertError(f"{path}: '{key}' must be a finite number, got {value!r}")
    if not isinstance(config["r"], int) and not float(config["r"]).is_integer():
        raise ConvertError(f"{path}: 'r' must be an integer, got {config['r']!r}")
    if abs(config["lora_alpha"]) > MAX_ALPHA:
        raise ConvertError(f"{path}: lora_alpha {config['lora_alpha']!r} is beyond {MAX_ALPHA:g}; the adapter would overflow")
    if config["r"] <= 0 or config["lora_alpha"] == 0:
        raise ConvertError(f"{path}: r must be > 0 and lora_alpha non-zero (r={config['r']}, lora_alpha={config['lora_alpha']})")
    if config.get("use_dora"):
        raise ConvertError(
            f"{path}: use_dora is set; DoRA rescales each weight column by a learned magnitude, which a GGUF LoRA "
            "cannot express. Merge it into the base (PeftModel.merge_and_unload) and convert the merged model instead"
        )
    if config.get("modules_to_save"):
        raise ConvertError(
            f"{path}: modules_to_save {config['modules_to_save']} holds fully trained layers, which a GGUF LoRA cannot "
            "carry. Merge the adapter into the base (merge_and_unload) and convert the merged model, or retrain without them"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ConvertError(
            f"{path}: trained biases (bias={config.get('bias')!r}, lora_bias={config.get('lora_bias', False)}) are not "
            "part of a GGUF LoRA; retrain with bias='none'"
        )
    if config.get("fan_in_fan_out"):
        raise ConvertError(f"{path}: fan_in_fan_out (GPT-2 style Conv1D layers) is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise ConvertError(f"{path}: '{key}' must be an object, got {type(config[key]).__name__}")
        for pattern, value in patterns.items():
            try:
                regex.compile(pattern)
            except regex.error as exc:
                raise ConvertError(f"{path}: {key} pattern {pattern!r} is not a valid regular expression ({exc})") from None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or (
                    key == "rank_pattern" and (value <= 0 or not float(value).is_integer())) or (
                    key == "alpha_pattern" and (value == 0 or abs(value) > MAX_ALPHA)):
                raise ConvertError(f"{path}: {key}[{pattern!r}] = {value!r} is not a valid "
                                   f"{'rank (a positive integer)' if key == 'rank_pattern' else 'alpha (a finite non-zero number)'}")


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            out = {}
            for name in names:
                dtype = f.get_slice(name).get_dtype()
                out[name] = _read_bf16(path, name) if dtype == "BF16" else f.get_tensor(name)
            return out
    except ConvertError:
        raise
    except Exception as exc:
        raise ConvertError(f"{path}: cannot read safetensors ({exc})") from None


def _read_bf16(path: Path, name: str) -> np.ndarray:
    """numpy has no bfloat16, so safetensors' numpy reader refuses it; widen the raw bits to f32."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        entry = json.loads(fh.read(n))[name]
        begin, end = entry["data_offsets"]
        fh.seek(8 + n + begin)
        bits = np.frombuffer(fh.read(end - begin), dtype="<u2")
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def _pair_modules(tensors: dict[str, np.ndarray], config: dict, path: Path) -> list[LoraModule]:
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if ".base_layer." in key:
            continue  # PEFT's copy of a base embedding (save_embedding_layers); the GGUF base has its own
        if "modules_to_save" in key:
            raise ConvertError(f"{path}: {key} is a fully trained layer (modules_to_save); a GGUF LoRA cannot carry it")
        m = _KEY.match(key)
        if m is None:
            if key.endswith(".bias"):
                raise ConvertError(f"{path}: {key} is a trained bias; a GGUF LoRA has none (retrain with bias='none')")
            raise ConvertError(f"{path}: {key} is not a LoRA tensor this converter knows")
        if m["kind"] == "lora_magnitude_vector":
            raise ConvertError(f"{path}: {key} is a DoRA magnitude vector; DoRA cannot be expressed as a GGUF LoRA")
        if not np.issubdtype(value.dtype, np.floating):
            raise ConvertError(f"{path}: {key} has dtype {value.dtype}; expected floating point")
        if not np.isfinite(value).all():
            raise ConvertError(f"{path}: {key} holds NaN or Inf values")
        parts.setdefault(m["module"], {})[m["kind"]] = value
    if not parts:
        raise ConvertError(f"{path}: no LoRA tensors found")

    rslora = bool(config.get("use_rslora"))
    modules = []
    for module, kinds in sorted(parts.items(), key=lambda kv: _natural(kv[0])):
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a = kinds.get("lora_embedding_A" if embedding else "lora_A")
        b = kinds.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            raise ConvertError(f"{path}: {module} has {' and '.join(sorted(kinds))} but not its pair")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ConvertError(f"{path}: {module} has lora A {list(a.shape)} and B {list(b.shape)}, which do not pair")
        rank = a.shape[0]
        if rank == 0:
            raise ConvertError(f"{path}: {module} has rank 0")
        want_r = pattern_value(config.get("rank_pattern") or {}, module, config["r"], f"{path.parent / CONFIG}: rank_pattern")
        if rank != want_r:
            raise ConvertError(
                f"{path}: {module} has rank {rank} in the weights but {want_r} in {CONFIG} (config and weights do not match)"
            )
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"],
                                    f"{path.parent / CONFIG}: alpha_pattern"))
        modules.append(LoraModule(module, embedding, a, b, rank, alpha, peft_scaling(rank, alpha, rslora)))
    return modules


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()
