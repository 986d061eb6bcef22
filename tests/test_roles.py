"""Roles and the adapter registry: manifests, stacking, residency, integrity, compatibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgelora import Engine
from edgelora.config import Config, ConfigError, load_config
from edgelora.errors import NotGGUFError
from edgelora.roles.residency import CompatibilityError, IntegrityError
from edgelora.roles.manifest import RoleCatalog, RoleError, load_manifest
from edgelora.roles.session import Roles
from edgelora.safety.signing import SignatureError, keygen, sign

from .conftest import GREEDY, write_role

MSG = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture
def roles_dir(tmp_path, smol_adapters):
    d = tmp_path / "roles"
    for name in ("a", "b", "c"):
        write_role(d, name, smol_adapters[name], base='architecture = "llama"')
    return d


@pytest.fixture
def roles(clean_engine, roles_dir):
    return Roles(clean_engine, Config(), catalog=RoleCatalog([roles_dir]))


def run_cli(*args, input=""):
    return subprocess.run([sys.executable, "-m", "edgelora", *args], input=input, capture_output=True, text=True,
                          timeout=180, env=os.environ)


# ------------------------------------------------------------------ manifests


@pytest.mark.parametrize(
    "body, text",
    [
        ('name = "x"\ncolour = "red"\n[[adapters]]\nfile = "a.gguf"\nsha256 = "' + "0" * 64 + '"', "unknown key 'colour'"),
        ('name = 3\n[[adapters]]\nfile = "a.gguf"\nsha256 = "' + "0" * 64 + '"', "'name' must be str"),
        ('description = "no name"\n[[adapters]]\nfile = "a.gguf"\nsha256 = "' + "0" * 64 + '"', "missing key 'name'"),
        ('name = "x"\n[[adapters]]\nfile = "a.gguf"', "missing key 'adapters[0].sha256'"),
        ('name = "x"\n[[adapters]]\nfile = "a.gguf"\nsha256 = "abc"', "must be 64 lowercase hex digits"),
        ('name = "x"\n[[adapters]]\nfile = "a.gguf"\nsha256 = "' + "0" * 64 + '"\nscale = "high"', "'adapters[0].scale' must be float or int"),
        ('name = "x"\ninclude = ["y"]\n[sampling]\ntemperature = "hot"', "'sampling.temperature' must be float or int"),
        ('name = "x"\ninclude = ["y"]\n[routing]\nregex = ["("]', "is not a valid regular expression"),
        ('name = "x"\ninclude = ["y"]\n[routing]\nmood = 1', "unknown key 'routing.mood'"),
        ('name = "base"\ninclude = ["y"]', "'name' 'base' is not allowed"),
        ('name = "x"', "needs at least one [[adapters]] entry"),
        ('name = "x" = 1', "not valid TOML"),
    ],
)
def test_malformed_manifest_names_file_and_key(tmp_path, body, text):
    path = tmp_path / "role.toml"
    path.write_text(body)
    with pytest.raises(RoleError) as info:
        load_manifest(path)
    assert text in str(info.value) and "role.toml" in str(info.value)


def test_role_cycle_and_duplicate_names_are_refused(tmp_path, smol_adapters):
    d1, d2 = tmp_path / "one", tmp_path / "two"
    write_role(d1, "a", smol_adapters["a"])
    write_role(d2, "a", smol_adapters["b"])
    (d1 / "x.toml").write_text('name = "x"\ninclude = ["y:0.5"]\n')
    (d1 / "y.toml").write_text('name = "y"\ninclude = ["x"]\n')
    catalog = RoleCatalog([d1, d2])
    assert "a" in catalog.collisions()
    with pytest.raises(RoleError, match="defined more than once"):
        catalog.get("a")
    with pytest.raises(RoleError, match="role cycle: x -> y -> x"):
        catalog.resolve(["x"])


def test_include_multiplies_weights(tmp_path, smol_adapters):
    d = tmp_path / "r"
    write_role(d, "a", smol_adapters["a"], scale=0.8)
    write_role(d, "b", smol_adapters["b"])
    (d / "mix.toml").write_text('name = "mix"\ninclude = ["a:0.5", "b:0.25"]\n')
    resolved = RoleCatalog([d]).resolve(["mix:2"])
    assert sorted(round(s, 6) for _, s, _ in resolved.adapters) == [0.5, 0.8]


def test_config_unknown_key_and_type(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text("max_resident_adapters = 4\nflavour = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'flavour'"):
        load_config(p)
    p.write_text('max_resident_adapters = "four"\n')
    with pytest.raises(ConfigError, match="'max_resident_adapters' must be int"):
        load_config(p)
    p.write_text("max_resident_adapters = 4\ntrusted_keys = ['abc']\n")
    assert load_config(p).max_resident_adapters == 4


# ------------------------------------------------------------------ use, stack, switch


def test_use_stack_and_base(roles):
    roles.use(["a:0.7", "b:0.3"])
    assert roles.engine.active == {"a": 0.7, "b": 0.3}
    assert roles.current.label == "a:0.7 + b:0.3"
    roles.use("base")
    assert roles.engine.active == {}


def test_stacked_role_answers_like_engine_with_same_scales(roles, smol_path, smol_adapters):
    roles.use(["a:0.7", "b:0.3"])
    got = roles.chat(MSG, max_tokens=16, **GREEDY).text
    with Engine(smol_path, n_ctx=1024) as eng:
        eng.attach(smol_adapters["a"], name="a", scale=0.7)
        eng.attach(smol_adapters["b"], name="b", scale=0.3)
        assert eng.chat(MSG, max_tokens=16, **GREEDY).text == got


def test_resident_role_switches_in_without_the_disk(roles, roles_dir, smol_adapters, tmp_path):
    roles.use("c")
    roles.use("base")
    moved = tmp_path / "moved.gguf"
    os.replace(smol_adapters["c"], moved)  # the file is gone: only the resident copy can serve
    try:
        roles.use("c")
        assert roles.engine.active == {"c": 1.0}
        assert roles.chat(MSG, max_tokens=4, **GREEDY).completion_tokens >= 1
    finally:
        os.replace(moved, smol_adapters["c"])


def test_lru_eviction_by_count_pins_active(clean_engine, roles_dir):
    roles = Roles(clean_engine, Config(max_resident_adapters=2), catalog=RoleCatalog([roles_dir]))
    for name in ("a", "b", "c"):
        roles.use(name)
    assert set(clean_engine.resident) == {"b", "c"} and clean_engine.active == {"c": 1.0}
    roles.use(["a", "b"])  # both needed at once: c is evicted, a reloaded
    assert set(clean_engine.resident) == {"a", "b"}
    for name in list(clean_engine.resident):
        clean_engine.free(name)


def test_lru_eviction_by_bytes(clean_engine, roles_dir, smol_adapters):
    budget = smol_adapters["a"].stat().st_size + 1  # room for one adapter of that size
    roles = Roles(clean_engine, Config(max_resident_bytes=budget), catalog=RoleCatalog([roles_dir]))
    roles.use("a")
    roles.use("b")
    assert list(clean_engine.resident) == ["b"]
    clean_engine.free("b")


# ------------------------------------------------------------------ integrity and compatibility


def _still_working(roles):
    before = roles.chat(MSG, max_tokens=8, **GREEDY).text
    return lambda: roles.chat(MSG, max_tokens=8, **GREEDY).text == before and roles.engine.active == {"a": 1.0}


def test_hash_mismatch_is_refused_before_parsing(roles, roles_dir, tmp_path):
    roles.use("a")
    ok = _still_working(roles)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    write_role(roles_dir, "junk", junk, sha="1" * 64)
    roles.catalog = RoleCatalog([roles_dir])
    with pytest.raises(IntegrityError) as info:
        roles.use("junk")
    assert "junk.gguf" in str(info.value) and "1" * 64 in str(info.value)  # both hashes named
    # with the right pin the file is parsed, and then refused for what it is
    write_role(roles_dir, "junk", junk)
    roles.catalog = RoleCatalog([roles_dir])
    with pytest.raises(NotGGUFError):
        roles.use("junk")
    assert ok()


def test_manifest_for_another_base_is_refused_unless_forced(clean_engine, tmp_path, smol_adapters):
    d = tmp_path / "r"
    write_role(d, "a", smol_adapters["a"])
    write_role(d, "other", smol_adapters["b"], base='architecture = "llama"\nsha256 = "' + "2" * 64 + '"')
    write_role(d, "qwen", smol_adapters["c"], base='architecture = "qwen2"')
    roles = Roles(clean_engine, Config(), catalog=RoleCatalog([d]))
    roles.use("a")
    ok = _still_working(roles)
    with pytest.raises(CompatibilityError, match="made for base sha256 2222"):
        roles.use("other")
    with pytest.raises(CompatibilityError, match="made for a qwen2 base; the loaded base is llama"):
        roles.use("qwen")
    assert ok()
    forced = Roles(clean_engine, Config(), catalog=RoleCatalog([d]), force=True)
    forced.use("other")  # the adapter itself fits: shapes are still checked, and pass
    assert clean_engine.active == {"other": 1.0}


def test_truncated_adapter_with_matching_pin_is_refused(roles, roles_dir, smol_adapters, tmp_path):
    roles.use("a")
    ok = _still_working(roles)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smol_adapters["b"].read_bytes()[:5000])
    write_role(roles_dir, "cut", cut)
    roles.catalog = RoleCatalog([roles_dir])
    with pytest.raises(NotGGUFError):
        roles.use("cut")
    assert ok()


def test_signatures(roles_dir, smol_adapters, tmp_path, clean_engine):
    key = tmp_path / "key.pem"
    public = keygen(key)
    sign(smol_adapters["a"], key)
    try:
        strict = Roles(clean_engine, Config(require_signatures=True, trusted_keys=[public]), catalog=RoleCatalog([roles_dir]))
        strict.use("a")  # signed by a trusted key
        with pytest.raises(SignatureError, match="has no signature"):
            strict.use("b")
        other = tmp_path / "other.pem"
        stranger = Roles(clean_engine, Config(trusted_keys=[keygen(other)]), catalog=RoleCatalog([roles_dir]))
        clean_engine.free("a")
        with pytest.raises(SignatureError, match="does not match any trusted key"):
            stranger.use("a")
    finally:
        (smol_adapters["a"].parent / "a.gguf.sig").unlink()


# ------------------------------------------------------------------ CLI


def test_cli_roles_add_list_show_ask_remove(roles_dir, isolated_home):
    added = run_cli("roles", "add", str(roles_dir / "a.toml"))
    assert added.returncode == 0, added.stderr
    again = run_cli("roles", "add", str(roles_dir / "a.toml"))
    assert again.returncode == 2 and "already exists" in again.stderr
    listed = json.loads(run_cli("roles", "list", "--json").stdout)
    assert "a" in [r["name"] for r in listed["roles"]]
    assert "sha256" in run_cli("roles", "show", "a").stdout
    out = run_cli("ask", "Name a colour.", "--role", "a:0.5", "--role", str(roles_dir / "b.toml") + ":0.5",
                  "--json", "--temperature", "0", "--max-tokens", "4")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert {a["name"]: a["scale"] for a in data["adapters"]} == {"a": 0.5, "b": 0.5}
    assert data["role"] == "a:0.5 + b:0.5"
    assert run_cli("adapters", "verify").returncode == 0
    removed = run_cli("roles", "remove", "a")
    assert removed.returncode == 0 and not (isolated_home / "roles" / "a.toml").exists()
    bundled = run_cli("roles", "remove", "base")
    assert bundled.returncode == 2


def test_cli_verify_reports_a_tampered_adapter(roles_dir, isolated_home, tmp_path, smol_adapters):
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(smol_adapters["c"].read_bytes())
    write_role(roles_dir, "tampered", copy)
    assert run_cli("roles", "add", str(roles_dir / "tampered.toml")).returncode == 0
    installed = isolated_home / "roles" / "tampered" / "copy.gguf"
    installed.write_bytes(installed.read_bytes()[:-1] + b"\x01")
    result = run_cli("adapters", "verify")
    assert result.returncode == 2 and "BAD" in result.stdout and "sha256 is" in result.stdout


def test_cli_unknown_role_exit_2(isolated_home):
    result = run_cli("ask", "hi", "--role", "nope")
    assert result.returncode == 2 and "unknown role 'nope'" in result.stderr


# ------------------------------------------------------------------ what a role sees of earlier turns


def test_history_key_must_be_all_user_or_none(tmp_path, smol_adapters):
    path = write_role(tmp_path, "x", smol_adapters["a"], extra='history = "assistant"')
    with pytest.raises(RoleError, match=r"x\.toml: 'history' must be one of 'all', 'user', 'none', got 'assistant'"):
        load_manifest(path)
    assert load_manifest(write_role(tmp_path, "y", smol_adapters["a"])).history == "all"  # the default


TURNS = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Name a colour."},
         {"role": "assistant", "content": "Arr, red be a colour, matey!"}, {"role": "user", "content": "And a fruit?"}]


@pytest.mark.parametrize("history, seen", [("all", [0, 1, 2, 3]), ("user", [0, 1, 3]), ("none", [0, 3])])
def test_role_history_setting_decides_which_earlier_turns_the_model_is_given(clean_engine, tmp_path, smol_adapters,
                                                                           history, seen):
    write_role(tmp_path, "r", smol_adapters["a"], extra=f'history = "{history}"')
    roles = Roles(clean_engine, Config(), catalog=RoleCatalog([tmp_path]))
    roles.use("r")
    out = roles.chat(TURNS, max_tokens=1, temperature=0.0)
    given = [TURNS[i] for i in seen]
    assert out.usage["prompt_tokens"] == len(clean_engine.render_chat(given)[0])


@pytest.mark.slow  # three real answers: about 20 s idle, minutes on a busy machine
def test_bundled_json_role_answers_json_after_pirate_and_terse_turns(clean_engine):
    """The newcomer's case: after answers in other voices, /role json wrote unterminated JSON."""
    from edgelora.conversation.chat import ChatSession
    from edgelora.roles.manifest import bundled_dir

    roles = Roles(clean_engine, Config(), catalog=RoleCatalog([bundled_dir()]))
    session = ChatSession(roles, None, max_tokens=120)
    for role, prompt in [("pirate", "What is the moon?"), ("terse", "And the sun?"), ("json", "What about stars?")]:
        roles.use(role)
        session.add_user(prompt)
        text = "".join(session.stream_reply(session.start_reply()))  # greedy: the roles' temperature is 0
    assert roles.catalog.get("json").history == "user"
    assert set(json.loads(text)) == {"answer"}
