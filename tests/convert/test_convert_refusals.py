"""The converter refuses what a GGUF LoRA cannot express, says why, and writes nothing.

PEFT folders here are written with numpy + safetensors (no torch needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

from edgelora.convert import ConvertError, convert_peft, plan_conversion

PREFIX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"


def make_peft(folder: Path, *, config=None, tensors=None, r=4) -> Path:
    """A valid SmolLM2 PEFT LoRA on q_proj (576->576) and v_proj (576->192), then overrides."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
           "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "bias": "none"}
    cfg.update(config or {})
    ts = {
        f"{PREFIX}{Q}.lora_A.weight": rng.standard_normal((r, 576)).astype(np.float32),
        f"{PREFIX}{Q}.lora_B.weight": rng.standard_normal((576, r)).astype(np.float32),
        f"{PREFIX}{V}.lora_A.weight": rng.standard_normal((r, 576)).astype(np.float32),
        f"{PREFIX}{V}.lora_B.weight": rng.standard_normal((192, r)).astype(np.float32),
    }
    for k, v in (tensors or {}).items():
        if v is None:
            ts.pop(k, None)
        else:
            ts[k] = v
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if ts:
        save_file(ts, str(folder / "adapter_model.safetensors"))
    return folder


def _nan():
    b = np.ones((576, 4), np.float32)
    b[3, 2] = np.nan
    return b


def _pickle_only(folder):
    make_peft(folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


CASES = {
    "dora-config": (dict(config={"use_dora": True}), "use_dora is set"),
    "dora-weights": (dict(tensors={f"{PREFIX}{Q}.lora_magnitude_vector": np.ones(576, np.float32)}), "DoRA magnitude vector"),
    "modules-to-save": (dict(config={"modules_to_save": ["lm_head"]}), "modules_to_save ['lm_head']"),
    "modules-to-save-tensor": (
        dict(tensors={f"{PREFIX}lm_head.modules_to_save.default.weight": np.ones((4, 4), np.float32)}),
        "fully trained layer (modules_to_save)",
    ),
    "bias-config": (dict(config={"bias": "lora_only"}), "trained biases"),
    "bias-tensor": (dict(tensors={f"{PREFIX}{Q}.bias": np.ones(576, np.float32)}), "is a trained bias"),
    "no-gguf-counterpart": (
        dict(tensors={f"{PREFIX}model.layers.0.self_attn.rotary_emb.lora_A.weight": np.ones((4, 64), np.float32),
                      f"{PREFIX}model.layers.0.self_attn.rotary_emb.lora_B.weight": np.ones((64, 4), np.float32)}),
        "has no counterpart in a GGUF llama model",
    ),
    "shape": (dict(tensors={f"{PREFIX}{Q}.lora_B.weight": np.ones((512, 4), np.float32)}), "maps 576 -> 512 features"),
    "nan": (dict(tensors={f"{PREFIX}{Q}.lora_B.weight": _nan()}), "holds NaN or Inf"),
    "config-rank-mismatch": (dict(config={"r": 8}), "rank 4 in the weights but 8 in adapter_config.json"),
    "rank-pattern-mismatch": (dict(config={"rank_pattern": {"v_proj": 2}}), "rank 4 in the weights but 2"),
    "unpaired": (dict(tensors={f"{PREFIX}{Q}.lora_B.weight": None}), "has lora_A but not its pair"),
    "lm-head-tied": (
        dict(tensors={f"{PREFIX}lm_head.lora_A.weight": np.ones((4, 576), np.float32),
                      f"{PREFIX}lm_head.lora_B.weight": np.ones((49152, 4), np.float32)}),
        "ties its output to token_embd",
    ),
    "embedding-tied": (
        dict(tensors={f"{PREFIX}model.embed_tokens.lora_embedding_A": np.ones((4, 49152), np.float32),
                      f"{PREFIX}model.embed_tokens.lora_embedding_B": np.ones((576, 4), np.float32)}),
        "ties its output",
    ),
    "not-lora": (dict(config={"peft_type": "IA3"}), "peft_type is IA3"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_reason_and_nothing_written(case, tmp_path, smol_path):
    kwargs, text = CASES[case]
    folder = make_peft(tmp_path / case, **kwargs)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConvertError) as info:
        convert_peft(folder, smol_path, out)
    assert text in str(info.value)
    assert not out.exists()
    assert list(tmp_path.glob(".*.tmp")) == []


def test_pickle_is_never_loaded(tmp_path, smol_path):
    folder = tmp_path / "pickled"
    _pickle_only(folder)
    with pytest.raises(ConvertError) as info:
        convert_peft(folder, smol_path, tmp_path / "out.gguf")
    assert "pickle" in str(info.value) and "safe_serialization=True" in str(info.value)
    assert not (tmp_path / "out.gguf").exists()


def test_a_failed_write_keeps_the_existing_good_file(tmp_path, smol_path, monkeypatch):
    folder = make_peft(tmp_path / "good")
    out = tmp_path / "adapter.gguf"
    convert_peft(folder, smol_path, out)
    before = out.read_bytes()

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_peft(make_peft(tmp_path / "other", r=8, config={"r": 8}), smol_path, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["adapter.gguf"]


def test_output_metadata_records_its_base(tmp_path, smol_path, engine):
    out = tmp_path / "a.gguf"
    plan = convert_peft(make_peft(tmp_path / "src"), smol_path, out, name="my-adapter")
    meta = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "my-adapter"
    assert meta["adapter.lora.alpha"] == pytest.approx(8.0)
    assert meta["edgelora.base.sha256"] == plan.base_sha256 and len(plan.base_sha256) == 64
    assert meta["edgelora.source.base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(meta["edgelora.source.config_sha256"]) == 64
    # and the runtime accepts it
    engine.attach(out, name="converted")
    engine.detach("converted", free=True)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, smol_path):
    folder = make_peft(tmp_path / "src", config={"rank_pattern": {}, "alpha_pattern": {"v_proj": 16}})
    out = tmp_path / "never.gguf"
    result = subprocess.run(
        [sys.executable, "-m", "edgelora", "convert", str(folder), "--base", str(smol_path), "-o", str(out), "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.self_attn.q_proj" in result.stdout and "blk.0.attn_q.weight" in result.stdout
    q_line = next(line for line in result.stdout.splitlines() if "blk.0.attn_q.weight" in line)
    v_line = next(line for line in result.stdout.splitlines() if "blk.1.attn_v.weight" in line)
    assert "(q/k permuted)" in q_line and "(q/k permuted)" not in v_line
    assert not out.exists()


def test_cli_refusal_is_one_line_exit_2(tmp_path, smol_path):
    folder = make_peft(tmp_path / "dora", config={"use_dora": True})
    result = subprocess.run(
        [sys.executable, "-m", "edgelora", "convert", str(folder), "--base", str(smol_path), "-o", str(tmp_path / "x.gguf")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "use_dora" in result.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_alpha_pattern_is_folded_into_lora_b(tmp_path, smol_path):
    plan = plan_conversion(make_peft(tmp_path / "src", config={"alpha_pattern": {"v_proj": 16}}), smol_path)
    fold = {t.target: t.fold for t in plan.tensors}
    assert plan.alpha == pytest.approx(8.0)
    assert fold["blk.0.attn_q.weight"] == pytest.approx(1.0)
    assert fold["blk.1.attn_v.weight"] == pytest.approx(2.0)
