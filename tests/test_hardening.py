"""Hostile inputs from the attack pass (issue "Hardening"): each is refused with one clear line or a
typed error, nothing native dies, no file is destroyed, and the engine keeps answering.
Every hostile file is built here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType as T

from edgelora.safety import cpu

from edgelora import errors
from edgelora.frontends.cli.main import cli
from edgelora.runtime.engine import Engine
from edgelora.models.gguf_info import read_gguf
from edgelora.files import sha256_file
from edgelora.roles.manifest import RoleCatalog, RoleError, load_manifest

from . import gguf_factory as gf
from .conftest import GREEDY, write_role

MSG = [{"role": "user", "content": "Name a colour."}]
Q = "blk.3.attn_q.weight"


def run(*args, input=None, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgelora", *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_line_exit_2(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-400:])
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


@pytest.fixture
def answering(clean_engine):
    """The shared engine, and a check that it still answers as it did before the hostile input
    (both answers evaluated from scratch, so they compare token for token)."""
    clean_engine.reuse_prefix = False
    before = clean_engine.chat(MSG, max_tokens=6, **GREEDY).text

    def still_answers():
        assert clean_engine.active == {}
        assert clean_engine.chat(MSG, max_tokens=6, **GREEDY).text == before

    yield clean_engine, still_answers
    clean_engine.reuse_prefix = True


def lora(smol_info, path: Path, alpha=8.0, **kw) -> Path:
    return gf.write_lora(path, gf.random_lora(smol_info.tensors, [Q], rank=4, seed=3), alpha=alpha, **kw)


# 1 -------------------------------------------------------------------------- alpha of the wrong type
@pytest.mark.parametrize("value, vtype", [(8, T.UINT32), (8, T.INT32), (8.0, T.FLOAT64), (True, T.BOOL), ("8", T.STRING)])
def test_alpha_of_another_type_is_refused_not_aborted(answering, smol_info, tmp_path, value, vtype):
    eng, still_answers = answering
    bad = lora(smol_info, tmp_path / "alpha.gguf", kv={"adapter.lora.alpha": (value, vtype)})
    with pytest.raises(errors.AdapterError, match="adapter.lora.alpha is .*llama.cpp needs float32"):
        eng.attach(bad, name="bad")
    still_answers()


# 2 -------------------------------------------------------------------------- corrupted base models
@pytest.mark.parametrize("key, value, vtype", [
    ("llama.block_count", 0, T.UINT32),
    ("llama.block_count", 2**32 - 1, T.UINT32),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), T.FLOAT32),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, T.FLOAT32),
    ("llama.context_length", 2**32 - 1, T.UINT32),
    ("llama.rope.freq_base", float("nan"), T.FLOAT32),
    ("llama.rope.freq_base", 0.0, T.FLOAT32),
    ("llama.rope.freq_base", -10000.0, T.FLOAT32),
])
def test_corrupted_base_hyperparameters_are_refused_naming_the_key(tiny, smol_path, tmp_path, key, value, vtype):
    weights = gf.tiny_weights(len(gf.gguf.GGUFReader(smol_path).fields["tokenizer.ggml.tokens"].data), seed=0)
    base = gf.write_llama(tmp_path / "bad-base.gguf", weights, smol_path, kv={key: (value, vtype)})
    with pytest.raises(errors.ModelError, match=key.replace(".", r"\.")):
        Engine(base, n_ctx=256)
    one_line_exit_2(run("ask", "hi", "-m", str(base), "--no-log"), key)


# 4 -------------------------------------------------------------------------- signatures on every path
def test_require_signatures_applies_to_adapters_given_by_path(answering, isolated_home, smol_adapters, tmp_path):
    from edgelora.safety.signing import keygen, sign

    eng, still_answers = answering
    trusted, other = keygen(tmp_path / "trusted.pem"), keygen(tmp_path / "other.pem")
    (isolated_home / "config.toml").write_text(f'require_signatures = true\ntrusted_keys = ["{trusted}"]\n')
    unsigned = shutil.copy(smol_adapters["a"], tmp_path / "unsigned.gguf")
    by_other = shutil.copy(smol_adapters["a"], tmp_path / "by-other.gguf")
    sign(Path(by_other), tmp_path / "other.pem")
    good = shutil.copy(smol_adapters["a"], tmp_path / "good.gguf")
    sign(Path(good), tmp_path / "trusted.pem")

    with pytest.raises(errors.AdapterError, match="no signature"):
        eng.attach(unsigned, name="u")
    with pytest.raises(errors.AdapterError, match="does not match any trusted key"):
        eng.attach(by_other, name="o")
    still_answers()
    one_line_exit_2(run("ask", "hi", "--adapter", str(unsigned), "--no-log"), "no signature")
    eng.attach(good, name="good")  # signed by a trusted key: loads
    eng.detach_all()


# 6 -------------------------------------------------------------------------- convert -o destroys nothing
@pytest.fixture
def peft(tmp_path, tiny):
    from edgelora.bench.run import write_synthetic_peft

    return write_synthetic_peft(tmp_path / "peft", tiny["base"], rank=2)


def test_convert_never_overwrites_the_base_the_sources_or_other_files(peft, tiny, tmp_path):
    base_sha = sha256_file(tiny["base"])
    src = peft / "adapter_model.safetensors"
    src_sha = sha256_file(src)
    one_line_exit_2(run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(tiny["base"])), "base model")
    one_line_exit_2(run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(src)), "PEFT folder")
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    one_line_exit_2(run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(notes)), "--force")
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    one_line_exit_2(run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(fifo)), "not a regular file")
    one_line_exit_2(run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(tmp_path)), "is a folder")
    assert sha256_file(tiny["base"]) == base_sha and sha256_file(src) == src_sha and notes.read_text() == "precious"
    forced = run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(notes), "--force")
    assert forced.returncode == 0 and read_gguf(notes).metadata["general.type"] == "adapter"


def test_convert_cleans_temp_files_of_interrupted_runs(peft, tiny, tmp_path):
    out = tmp_path / "out.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.gguf.{dead.stdout.strip()}.abc123.tmp"  # left by a killed conversion
    stale.write_bytes(b"\0" * 1000)
    assert run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(out)).returncode == 0
    assert not stale.exists() and out.exists()
    assert not list(tmp_path.glob(".out.gguf.*.tmp"))


# 9 -------------------------------------------------------------------------- history never loses what was shown
def test_corrupt_history_database_is_one_line_and_ask_still_answers(isolated_home):
    db = isolated_home / "history.sqlite3"
    db.write_bytes(b"this is not sqlite" * 100)
    asked = run("ask", "Name a colour.", "--max-tokens", "4", "--temperature", "0")
    assert asked.returncode == 0 and asked.stdout.strip()
    assert asked.stderr.count("\n") == 1 and "answering without history" in asked.stderr
    one_line_exit_2(run("history", "list"), "history")
    db.unlink()
    db.mkdir()
    one_line_exit_2(run("history", "list"), "not a regular file")


def test_locked_history_waits_then_answers_without_losing_the_answer(isolated_home, monkeypatch):
    from edgelora.conversation import history

    monkeypatch.setattr(history, "LOCK_WAIT_S", 0.3)
    History = history.History
    History().close()
    holder = sqlite3.connect(isolated_home / "history.sqlite3", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = CliRunner().invoke(cli, ["ask", "Name a colour.", "--max-tokens", "4", "--temperature", "0", "--no-stream"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.exit_code == 0 and result.stdout.strip()  # the answer is printed, not lost
    assert "answering without history" in result.stderr


def test_kill_9_mid_answer_keeps_the_prompt(isolated_home):
    proc = subprocess.Popen([sys.executable, "-m", "edgelora", "ask", "Count from 1 to 300.", "--max-tokens", "600",
                             "--temperature", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    proc.stdout.read(8)
    proc.kill()
    proc.wait()
    from edgelora.conversation.history import History

    h = History()
    latest = h.latest()
    assert latest is not None and [m.content for m in h.messages(latest.id)][0] == "Count from 1 to 300."


# 10 ------------------------------------------------------------------------- roles add
def test_roles_add_keeps_two_adapters_with_one_file_name(isolated_home, smol_adapters, tmp_path):
    for sub, key in (("one", "a"), ("two", "b")):
        (tmp_path / sub).mkdir()
        shutil.copy(smol_adapters[key], tmp_path / sub / "lora.gguf")
    manifest = tmp_path / "twin.toml"
    manifest.write_text(
        'name = "twin"\ndescription = "Ünïcode 🚢 description"\n'
        f'[[adapters]]\nfile = "one/lora.gguf"\nsha256 = "{sha256_file(smol_adapters["a"])}"\nscale = 0.5\n'
        f'[[adapters]]\nfile = "two/lora.gguf"\nsha256 = "{sha256_file(smol_adapters["b"])}"\nscale = 0.5\n')
    assert run("roles", "add", str(manifest)).returncode == 0
    installed = load_manifest(isolated_home / "roles" / "twin.toml")
    assert installed.description == "Ünïcode 🚢 description"
    assert [sha256_file(a.file) for a in installed.adapters] == [sha256_file(smol_adapters[k]) for k in "ab"]
    assert run("adapters", "verify").returncode == 0


def test_roles_add_refuses_a_non_adapter_with_a_matching_sha_and_a_file_in_the_way(isolated_home, tmp_path, smol_adapters):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not an adapter at all")
    manifest = write_role(tmp_path, "junk", junk)
    one_line_exit_2(run("roles", "add", str(manifest)), "junk.gguf")
    assert not (isolated_home / "roles" / "junk.toml").exists()
    (isolated_home / "roles").mkdir(exist_ok=True)
    (isolated_home / "roles" / "blocked").write_text("a file where the role's folder goes")
    good = write_role(tmp_path, "blocked", smol_adapters["a"])
    one_line_exit_2(run("roles", "add", str(good)), "belongs to no role")


# 11 ------------------------------------------------------------------------- hangs
def test_fifos_are_refused_not_waited_on(tmp_path, isolated_home, smol_adapters, answering):
    eng, still_answers = answering
    fifo = tmp_path / "role.toml"
    os.mkfifo(fifo)
    with pytest.raises(RoleError, match="not a regular file"):
        load_manifest(fifo)
    assert RoleCatalog([tmp_path]).errors  # a FIFO in a roles folder is reported, not read
    os.mkfifo(isolated_home / "config.toml")
    one_line_exit_2(run("config", "show", timeout=20), "not a regular file")
    (isolated_home / "config.toml").unlink()
    signed = shutil.copy(smol_adapters["a"], tmp_path / "s.gguf")
    os.mkfifo(tmp_path / "s.gguf.sig")
    (isolated_home / "config.toml").write_text('trusted_keys = ["AAAA"]\n')
    with pytest.raises(errors.AdapterError, match="not a regular file"):
        eng.attach(signed, name="s")
    still_answers()


def test_a_runaway_chat_template_is_stopped(engine):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    saved = engine._formatter
    engine._formatter = Jinja2ChatFormatter(
        template="{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        eos_token="", bos_token="")
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.ModelError, match="chat template ran over"):
            engine.render_chat(MSG)
        assert time.monotonic() - t0 < 10
    finally:
        engine._formatter = saved
    assert engine.chat(MSG, max_tokens=2, **GREEDY).text


@pytest.mark.parametrize("pattern", ["^(a+)+$", "^(a|aa)+$", "(x+x+)+y"])
def test_catastrophic_routing_regex_is_time_limited(tmp_path, smol_adapters, pattern):
    from edgelora.routing.router import route

    write_role(tmp_path, "slow", smol_adapters["a"], routing=f"regex = ['{pattern}']")
    catalog = RoleCatalog([tmp_path])
    t0 = time.monotonic()
    try:
        chosen = route("a" * 40 + "x" * 40 + "!", catalog.roles(), 0.25)
        assert chosen.role == "base"  # the regex engine finished on its own: no match
    except RoleError as exc:
        assert "catastrophic" in str(exc)  # or it was stopped, saying why
    assert time.monotonic() - t0 < 2  # Python's re module took over 60 s on the first pattern


def test_include_chains_are_bounded(tmp_path, smol_adapters):
    write_role(tmp_path, "r0", smol_adapters["a"])
    for i in range(1, 26):  # each role includes the previous one twice: 2**25 expansions unbounded
        prev = f"r{i - 1}"
        (tmp_path / f"r{i}.toml").write_text(f'name = "r{i}"\ninclude = ["{prev}:0.5", "{prev}:0.5"]\n')
    t0 = time.monotonic()
    with pytest.raises(RoleError, match="more than"):
        RoleCatalog([tmp_path]).resolve(["r25"])
    assert time.monotonic() - t0 < 5
    deep = tmp_path / "deep"
    write_role(deep, "d0", smol_adapters["a"])
    for i in range(1, 40):
        (deep / f"d{i}.toml").write_text(f'name = "d{i}"\ninclude = ["d{i - 1}"]\n')
    with pytest.raises(RoleError, match="deep"):
        RoleCatalog([deep]).resolve(["d39"])


# 12 ------------------------------------------------------------------------- tracebacks become one line
def test_invalid_utf8_input_is_one_line():
    r = subprocess.run([sys.executable, "-m", "edgelora", "ask", "--no-log", b"caf\xff".decode("utf-8", "surrogateescape")],
                       capture_output=True, text=True, timeout=60)
    one_line_exit_2(r, "UTF-8")
    r = subprocess.run([sys.executable, "-m", "edgelora", "ask", "--no-log", "-s", "\udc80", "hi"], capture_output=True,
                       text=True, timeout=60, errors="replace")
    one_line_exit_2(r, "UTF-8")


def test_lora_on_a_1d_base_tensor_is_a_shape_error(answering, smol_info, tmp_path):
    eng, still_answers = answering
    n = smol_info.tensors["blk.0.attn_norm.weight"][0]
    bad = gf.write_lora(tmp_path / "norm.gguf", {"blk.0.attn_norm.weight": (np.zeros((4, n), np.float32), np.zeros((n, 4), np.float32))}, alpha=4.0)
    with pytest.raises(errors.ShapeMismatchError, match="1-D"):
        eng.attach(bad, name="norm")
    still_answers()


def test_config_and_signature_oddities_are_one_line(isolated_home, smol_adapters, tmp_path):
    (isolated_home / "config.toml").write_text('roles_dirs = ["~nosuchuser/x"]\n')
    one_line_exit_2(run("roles", "list"), "roles_dirs")
    (isolated_home / "config.toml").write_text('\ufeffdefault_model = ""\n')  # a BOM is fine
    assert run("config", "show").returncode == 0


@pytest.mark.parametrize("config, words", [
    ([1, 2], "JSON object"), (None, "JSON object"), ("lora", "JSON object"),
    ({"r": 2, "lora_alpha": 4, "rank_pattern": {"(": 8}}, "regular expression"),
    ({"r": 2, "lora_alpha": 4, "alpha_pattern": {"q_proj": "big"}}, "alpha"),
    ({"r": 2, "lora_alpha": 1e300}, "lora_alpha"),
    ({"r": 2, "lora_alpha": float("nan")}, "finite"),
])
def test_converter_config_oddities_are_one_line(peft, tiny, config, words):
    (peft / "adapter_config.json").write_text(json.dumps(config))
    one_line_exit_2(run("convert", str(peft), "--base", str(tiny["base"]), "--dry-run"), words)


def test_converter_rank_0_and_f16_overflow(peft, tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(peft / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    big = dict(weights)
    big[key] = big[key] * 1e9  # f32 fine, f16 overflows to Inf
    save_file(big, str(peft / "adapter_model.safetensors"))
    one_line_exit_2(run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(tmp_path / "o.gguf")), "overflow")
    assert not (tmp_path / "o.gguf").exists()
    assert run("convert", str(peft), "--base", str(tiny["base"]), "-o", str(tmp_path / "o.gguf"), "--outtype", "f32").returncode == 0


def test_broken_chat_template_in_the_base_is_one_line(smol_path, tmp_path):
    weights = gf.tiny_weights(len(gf.gguf.GGUFReader(smol_path).fields["tokenizer.ggml.tokens"].data), seed=0)
    base = gf.write_llama(tmp_path / "tmpl.gguf", weights, smol_path,
                          kv={"tokenizer.chat_template": ("{% for x in %}", T.STRING)})
    with pytest.raises(errors.ModelError, match="chat template does not compile"):
        Engine(base, n_ctx=256)
    one_line_exit_2(run("ask", "hi", "-m", str(base), "--no-log"), "chat template")


# 13 ------------------------------------------------------------------------- nothing silently accepted
@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e30])
def test_absurd_alphas_are_refused(answering, smol_info, tmp_path, alpha):
    eng, still_answers = answering
    with pytest.raises(errors.NonFiniteError, match="adapter.lora.alpha"):
        eng.attach(lora(smol_info, tmp_path / "a.gguf", alpha=alpha), name="x")
    still_answers()


@pytest.mark.parametrize("scale", [1e38, float("nan"), -50.0])
def test_absurd_scales_are_refused(answering, smol_adapters, scale):
    eng, still_answers = answering
    with pytest.raises(errors.EdgeloraError, match="scale"):
        eng.attach(smol_adapters["a"], name="a", scale=scale)
    assert "a" not in eng.active
    eng.free("a") if "a" in eng.resident else None
    still_answers()


@pytest.mark.parametrize("flag, value", [("--temperature", "inf"), ("--temperature", "nan"), ("--seed", str(2**70))])
def test_absurd_sampling_flags_are_refused(flag, value):
    one_line_exit_2(run("ask", "hi", "--no-log", flag, value), flag.strip("-"))


def test_adapter_converted_for_another_base_is_refused_unless_forced(answering, smol_info, tmp_path):
    eng, still_answers = answering
    other = lora(smol_info, tmp_path / "other.gguf", kv={"edgelora.base.sha256": ("0" * 64, T.STRING)})
    with pytest.raises(errors.AdapterError, match="converted for base sha256 0000"):
        eng.attach(other, name="other")
    still_answers()
    eng.attach(other, name="other", force=True)
    eng.detach_all()


# 14 ------------------------------------------------------------------------- BOM, and the check/use window
def test_manifest_with_a_byte_order_mark_loads(tmp_path, smol_adapters):
    path = write_role(tmp_path, "bom", smol_adapters["a"])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_manifest(path).name == "bom"


def test_a_file_swapped_in_after_its_checks_is_not_what_llama_cpp_loads(clean_engine, smol_adapters, tmp_path, monkeypatch):
    from edgelora.safety import admission

    path = shutil.copy(smol_adapters["a"], tmp_path / "x.gguf")
    expected = Engine  # noqa: F841 - readability
    clean_engine.attach(smol_adapters["a"], name="ref")
    want = clean_engine.chat(MSG, max_tokens=8, **GREEDY).text
    clean_engine.detach_all()
    clean_engine.free("ref")

    real = admission.check_signature

    def swap_then_check(data, shown, config=None):
        os.replace(shutil.copy(smol_adapters["b"], tmp_path / "evil.gguf"), shown)  # the path now holds another file
        return real(data, shown, config)

    monkeypatch.setattr(admission, "check_signature", swap_then_check)
    clean_engine.load(path, name="x", sha256=sha256_file(smol_adapters["a"]))
    clean_engine.set_adapters({"x": 1.0})
    assert clean_engine.chat(MSG, max_tokens=8, **GREEDY).text == want  # the checked bytes, not the swapped ones
