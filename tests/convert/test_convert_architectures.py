"""Name mapping for every supported architecture, against small bases written with the gguf package
(header and shapes are all the plan needs). Fidelity itself is tested on llama and gemma3."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgelora.convert import ConvertError, plan_conversion

from .test_convert_refusals import make_peft

E, FF, HEADS, KV = 64, 96, 4, 2
KVD = E // HEADS * KV


def write_base(path, arch, tensors):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_block_count(1)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    for name, (n_out, n_in) in tensors.items():
        w.add_tensor(name, np.zeros((n_out, n_in), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SPLIT = {"blk.0.attn_q.weight": (E, E), "blk.0.attn_k.weight": (KVD, E), "blk.0.attn_v.weight": (KVD, E),
         "blk.0.attn_output.weight": (E, E), "blk.0.ffn_gate.weight": (FF, E), "blk.0.ffn_up.weight": (FF, E),
         "blk.0.ffn_down.weight": (E, FF)}
SPLIT_MODULES = {"self_attn.q_proj": (E, E), "self_attn.k_proj": (KVD, E), "self_attn.v_proj": (KVD, E),
                 "self_attn.o_proj": (E, E), "mlp.gate_proj": (FF, E), "mlp.up_proj": (FF, E), "mlp.down_proj": (E, FF)}
EXPECT = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def peft_for(folder, modules, r=4):
    rng = np.random.default_rng(0)
    tensors = {}
    for m, (n_out, n_in) in modules.items():
        key = f"base_model.model.model.layers.0.{m}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, n_in)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((n_out, r)).astype(np.float32)
    # make_peft's defaults describe SmolLM2 modules: replace them entirely
    defaults = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.1.self_attn.v_proj"]
    drop = {f"{k}.lora_{x}.weight": None for k in defaults for x in "AB"}
    return make_peft(folder, tensors={**drop, **tensors}, r=r)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"])
def test_split_projection_architectures(arch, tmp_path):
    base = write_base(tmp_path / "base.gguf", arch, SPLIT)
    plan = plan_conversion(peft_for(tmp_path / "peft", SPLIT_MODULES), base)
    got = {t.source.split("layers.0.")[1]: (t.target, t.permuted) for t in plan.tensors}
    for module, gg in EXPECT.items():
        target, permuted = got[module]
        assert target == f"blk.0.{gg}.weight"
        assert permuted == (arch == "llama" and gg in ("attn_q", "attn_k"))


def test_phi3_fused_qkv_and_gate_up(tmp_path):
    base = write_base(tmp_path / "base.gguf", "phi3", {
        "blk.0.attn_qkv.weight": (E + 2 * KVD, E), "blk.0.attn_output.weight": (E, E),
        "blk.0.ffn_up.weight": (2 * FF, E), "blk.0.ffn_down.weight": (E, FF)})
    modules = {"self_attn.qkv_proj": (E + 2 * KVD, E), "self_attn.o_proj": (E, E),
               "mlp.gate_up_proj": (2 * FF, E), "mlp.down_proj": (E, FF)}
    plan = plan_conversion(peft_for(tmp_path / "peft", modules), base)
    assert {t.target for t in plan.tensors} == {
        "blk.0.attn_qkv.weight", "blk.0.attn_output.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"}
    assert not any(t.permuted for t in plan.tensors)


def test_separate_q_k_v_lora_on_a_fused_base_is_refused(tmp_path):
    base = write_base(tmp_path / "base.gguf", "phi3", {"blk.0.attn_qkv.weight": (E + 2 * KVD, E)})
    with pytest.raises(ConvertError, match="does not have"):
        plan_conversion(peft_for(tmp_path / "peft", {"self_attn.q_proj": (E, E)}), base)
