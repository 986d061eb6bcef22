"""Shared fixtures: the real embedded SmolLM2 base, a tiny F32 reference model, random adapters."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from edgelora import Engine
from edgelora.models.gguf_info import read_gguf
from edgelora.models.catalog import default_model_path

from . import gguf_factory as gf

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# The CPU probe (cpu.py) runs once per run, on this host, as it does for a user: its verdict is made
# in a run-wide cache folder and copied into each test's own (tests of the probe point it elsewhere).
RUN_CACHE = Path(tempfile.mkdtemp(prefix="edgelora-test-cache-"))
os.environ["EDGELORA_CACHE_DIR"] = str(RUN_CACHE)

GREEDY = dict(temperature=0.0, seed=0)


@pytest.fixture(scope="session")
def smol_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def smol_info(smol_path):
    return read_gguf(smol_path)


@pytest.fixture(scope="session")
def engine(smol_path):
    """One shared engine on the default base; tests leave it with no adapters attached."""
    eng = Engine(smol_path, n_ctx=1024)
    yield eng
    eng.close()


def reset_engine(eng) -> None:
    """Nothing attached or resident, a new conversation (shared engines between tests)."""
    eng.detach_all()
    for name in list(eng.resident):
        eng.free(name)
    eng.new_conversation()


@pytest.fixture
def clean_engine(engine):
    """The shared engine with nothing attached or resident, before and after the test."""
    reset_engine(engine)
    yield engine
    reset_engine(engine)


@pytest.fixture(scope="session")
def smol_adapters(tmp_path_factory, smol_info):
    """Two random adapters for SmolLM2 that change its greedy output, plus a third on other modules."""
    d = tmp_path_factory.mktemp("smol_adapters")
    shapes = smol_info.tensors
    layers = range(0, 30, 3)
    a = gf.random_lora(shapes, [f"blk.{i}.attn_q.weight" for i in layers] + [f"blk.{i}.ffn_up.weight" for i in layers], rank=8, seed=11, std=0.12)
    b = gf.random_lora(shapes, [f"blk.{i}.attn_v.weight" for i in layers] + [f"blk.{i}.ffn_down.weight" for i in layers], rank=8, seed=22, std=0.12)
    c = gf.random_lora(shapes, [f"blk.{i}.attn_output.weight" for i in layers], rank=4, seed=33, std=0.12)
    return {
        "a": gf.write_lora(d / "a.gguf", a, alpha=16.0),
        "b": gf.write_lora(d / "b.gguf", b, alpha=16.0),
        "c": gf.write_lora(d / "c.gguf", c, alpha=8.0),
    }


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, smol_path):
    """A tiny F32 llama model, two random LoRAs for it, and the same LoRAs merged into its weights."""
    d = tmp_path_factory.mktemp("tiny")
    n_vocab = len(gf.gguf.GGUFReader(smol_path).fields["tokenizer.ggml.tokens"].data)
    weights = gf.tiny_weights(n_vocab, seed=0)
    base = gf.write_llama(d / "base.gguf", weights, smol_path)
    shapes = read_gguf(base).tensors
    l1 = gf.random_lora(shapes, [f"blk.{i}.{m}.weight" for i in range(2) for m in gf.ATTN_FFN], rank=4, seed=1, std=0.3)
    l2 = gf.random_lora(shapes, [f"blk.{i}.{m}.weight" for i in range(2) for m in ("attn_q", "ffn_down")], rank=2, seed=2, std=0.3)
    s1, s2 = 0.8, 0.5
    merged1 = gf.merge(weights, l1, alpha=8.0, scale=s1)
    merged12 = gf.merge(merged1, l2, alpha=None, scale=s2)
    return {
        "base": base,
        "lora1": gf.write_lora(d / "lora1.gguf", l1, alpha=8.0),
        "lora2": gf.write_lora(d / "lora2.gguf", l2, alpha=None),
        "scales": (s1, s2),
        "merged1": gf.write_llama(d / "merged1.gguf", merged1, smol_path),
        "merged12": gf.write_llama(d / "merged12.gguf", merged12, smol_path),
        "dir": d,
    }


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own data/cache folders, config file and Hugging Face cache (offline)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("EDGELORA_HOME", str(home))
    monkeypatch.setenv("EDGELORA_CONFIG", str(home / "config.toml"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    verdict = RUN_CACHE / "cpu-probe.json"
    if not verdict.exists():
        from edgelora.safety import cpu

        cpu.decide(default_model_path())  # the real probe, once per run, in RUN_CACHE
    (home / "cache").mkdir(exist_ok=True)
    shutil.copy(verdict, home / "cache" / "cpu-probe.json")
    monkeypatch.setenv("EDGELORA_CACHE_DIR", str(home / "cache"))
    return home


def write_role(folder: Path, name: str, adapter: Path, *, scale=1.0, extra: str = "", sha=None, **sections) -> Path:
    """A role manifest pinning ``adapter``'s sha256."""
    from edgelora.files import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    text = (
        f'name = "{name}"\ndescription = "test role {name}"\n{extra}\n'
        f'[[adapters]]\nfile = "{adapter}"\nsha256 = "{sha or sha256_file(adapter)}"\nscale = {scale}\n'
    )
    for section, body in sections.items():
        text += f"\n[{section}]\n{body}\n"
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path
