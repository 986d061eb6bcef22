"""Every refused adapter gets a typed error naming the file and the problem; nothing else is harmed."""

import numpy as np
import pytest

from edgelora import errors

from .. import gguf_factory as gf
from ..conftest import GREEDY

Q = "blk.3.attn_q.weight"
MSG = [{"role": "user", "content": "Name a colour."}]


def _good(shapes, seed=5):
    return gf.random_lora(shapes, [Q, "blk.3.attn_v.weight"], rank=4, seed=seed)


def _not_gguf(d, shapes):
    p = d / "notes.gguf"
    p.write_text("this is not a gguf file\n")
    return p


def _truncated(d, shapes):
    full = gf.write_lora(d / "full.gguf", _good(shapes), alpha=8.0)
    p = d / "truncated.gguf"
    p.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return p


def _base_model(d, shapes):
    return gf.write_lora(d / "model.gguf", _good(shapes), alpha=8.0, general_type="model")


def _control_vector(d, shapes):
    return gf.write_lora(d / "cvec.gguf", _good(shapes), alpha=8.0, adapter_type="control_vector")


def _other_arch(d, shapes):
    return gf.write_lora(d / "x.gguf", _good(shapes), alpha=8.0, arch="qwen2")


def _unpaired(d, shapes):
    a, _ = _good(shapes)[Q]
    return gf.write_lora(d / "unpaired.gguf", {}, alpha=8.0, extra_tensors={Q + ".lora_a": a})


def _unknown_tensor(d, shapes):
    lora = _good(shapes)
    lora["blk.99.attn_q.weight"] = lora[Q]
    return gf.write_lora(d / "unknown.gguf", lora, alpha=8.0)


def _rows(d, shapes):
    lora = _good(shapes)
    a, b = lora[Q]
    lora[Q] = (a, b[:512])
    return gf.write_lora(d / "rows.gguf", lora, alpha=8.0)


def _rank(d, shapes):
    lora = _good(shapes)
    a, b = lora[Q]
    lora[Q] = (a, b[:, :2])
    return gf.write_lora(d / "rank.gguf", lora, alpha=8.0)


def _nan(d, shapes):
    lora = _good(shapes)
    a, b = lora[Q]
    b = b.copy()
    b[7, 1] = np.nan
    lora[Q] = (a, b)
    return gf.write_lora(d / "nan.gguf", lora, alpha=8.0)


def _inf_f16(d, shapes):
    lora = _good(shapes)
    a, b = lora[Q]
    a = a.copy()
    a[0, 0] = np.inf
    lora[Q] = (a, b)
    return gf.write_lora(d / "inf16.gguf", lora, alpha=8.0, dtype=np.float16)


def _embedding_on_tied_base(d, shapes):
    # SmolLM2 has no output.weight: llama.cpp would apply this to the output projection and abort
    rng = np.random.default_rng(0)
    lora = {"token_embd.weight": (rng.standard_normal((49152, 4)).astype(np.float32), np.ones((576, 4), np.float32))}
    return gf.write_lora(d / "embd.gguf", lora, alpha=4.0)


def _missing(d, shapes):
    return d / "does-not-exist.gguf"


CASES = [
    (_not_gguf, errors.NotGGUFError, "is not a GGUF file"),
    (_truncated, errors.NotGGUFError, "truncated.gguf"),
    (_base_model, errors.NotLoraAdapterError, "general.type is 'model'"),
    (_control_vector, errors.NotLoraAdapterError, "adapter.type is 'control_vector'"),
    (_other_arch, errors.ArchitectureMismatchError, "was made for qwen2; the loaded base is llama"),
    (_unpaired, errors.TensorMismatchError, "blk.3.attn_q.weight.lora_b is missing"),
    (_unknown_tensor, errors.TensorMismatchError, "blk.99.attn_q.weight is not a tensor of the base"),
    (_rows, errors.ShapeMismatchError, "blk.3.attn_q.weight.lora_b has 512 rows, the base tensor has 576"),
    (_rank, errors.ShapeMismatchError, "lora_a has rank 4 but blk.3.attn_q.weight.lora_b has rank 2"),
    (_nan, errors.NonFiniteError, "blk.3.attn_q.weight.lora_b holds NaN or Inf"),
    (_inf_f16, errors.NonFiniteError, "blk.3.attn_q.weight.lora_a holds NaN or Inf"),
    (_embedding_on_tied_base, errors.TensorMismatchError, "ties its output to token_embd"),
    (_missing, errors.NotGGUFError, "no such file"),
]


@pytest.mark.parametrize("make, error, text", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_bad_adapter_is_refused_and_harms_nothing(make, error, text, tmp_path, clean_engine, smol_info, smol_adapters):
    eng = clean_engine
    eng.attach(smol_adapters["a"], name="a", scale=0.7)
    before = eng.chat(MSG, max_tokens=12, **GREEDY).text
    bad = make(tmp_path, smol_info.tensors)

    with pytest.raises(error) as info:
        eng.attach(bad, name="bad")
    message = str(info.value)
    assert text in message
    assert bad.name in message and "\n" not in message

    assert eng.active == {"a": 0.7}
    assert "bad" not in eng.resident
    assert eng.chat(MSG, max_tokens=12, **GREEDY).text == before
