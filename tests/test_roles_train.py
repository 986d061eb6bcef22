"""`edgelora roles train` (a role from a file of examples) and `roles add X.gguf --name N`."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time

import pytest

from edgelora.frontends.cli.main import main
from edgelora.files import sha256_file
from edgelora.roles.manifest import load_manifest

from .conftest import GREEDY

PAIRS = [{"prompt": f"Tell me about {t}.", "answer": f"{t.capitalize()} are nice.\n\nStay curious!"}
         for t in ("cats", "dogs", "owls", "trains", "kites", "boats", "clouds", "lamps")]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_cli(*args):
    """The real command in a child process: (exit code, stderr, torch imported?)."""
    code = ("import sys; from edgelora.frontends.cli.main import main; rc = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "roles", "train", *map(str, args)], capture_output=True,
                       text=True, timeout=180)
    return r.returncode, r.stderr, r.stdout


# ------------------------------------------------------------------ bad data files: one line, exit 2, no torch


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "answer": "b"}\nnot json\n', ":2: not a JSON object"),
    ('{"prompt": "a"}\n', ":1: missing key 'answer'"),
    ('{"prompt": "a", "answer": "  "}\n', ":1: 'answer' must be a non-empty string"),
    ('{"prompt": "a", "answer": "b", "mood": 1}\n', ":1: unknown key 'mood'"),
    ('["prompt", "answer"]\n', ":1: must be an object with 'prompt' and 'answer', got list"),
    ("\n\n", ": no examples"),
    ('{"prompt": "a", "answer": "b"}\n' * 5, ": 5 examples are too few to hold out 4 and train on at least 4"),
])
def test_a_bad_jsonl_file_is_one_line_naming_file_and_line(tmp_path, content, message, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    assert main(["roles", "train", "mine", "--data", str(data)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgelora: error: {data}") and message in lines[0], lines


def test_jsonl_lines_end_only_at_newline_not_at_unicode_line_separators(tmp_path, capsys):
    """U+2028, U+2029 and U+0085 are valid raw inside JSON strings: not line ends, no shifted numbers."""
    data = tmp_path / "d.jsonl"
    first = json.dumps({"prompt": "a\u2028b\u2029c\x85d", "answer": "e"}, ensure_ascii=False)
    data.write_text(first + "\r\n" + '{"prompt": "x"}\n', "utf-8")
    assert main(["roles", "train", "mine", "--data", str(data)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"edgelora: error: {data}:2: missing key 'answer'"]


def test_a_jsonl_line_nested_too_deeply_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("[" * 100_000 + "\n")
    assert main(["roles", "train", "mine", "--data", str(data)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"edgelora: error: {data}:1: nested too deeply; "
                                                            'one {"prompt", "answer"} object per line']


@pytest.mark.parametrize("args, message", [
    (["--epochs", "nan"], "--epochs nan: must be a number above 0"),
    (["--epochs", "inf"], "--epochs inf: must be a number above 0"),
    (["--lr", "nan"], "--lr nan: must be a number above 0"),
    (["--lr", "5"], "--lr 5.0: must be a number above 0 and at most 1"),
    (["--targets", "q_proj,a b"], "--targets 'q_proj,a b': module names"),
])
def test_options_click_lets_through_are_refused_in_one_line(tmp_path, args, message, capsys):
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    assert main(["roles", "train", "mine", "--data", str(data), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_name_too_long_for_a_file_name_is_refused(tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    assert main(["roles", "train", "a" * 240, "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edgelora: error: role name is 240 bytes long; a role name may have at most 200"], err


def test_a_bad_file_is_refused_before_torch_is_imported(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a"}\n')
    rc, err, _ = train_cli("mine", "--data", data)
    assert rc == 2 and err.strip().splitlines() == [f"edgelora: error: {data}:1: missing key 'answer'", "NO-TORCH"], err


@pytest.mark.parametrize("content, message", [
    ('system = "x"\ncolour = 1\n', "unknown key 'colour'"),
    ('[[examples]]\nprompt = "a"\n', ":1 (examples[1]): missing key 'answer'"),
    ('system = "s"\n\n[[examples]]\nprompt = "a"\nanswer = "b"\n\n[[examples]]\nprompt = "c"\n',
     ":7 (examples[2]): missing key 'answer'"),
    ('system = ""\n', "'system' must be a non-empty string"),
    ('[[examples]\n', "not valid TOML"),
])
def test_a_bad_toml_file_names_file_and_entry(tmp_path, content, message, capsys):
    data = tmp_path / "d.toml"
    data.write_text(content)
    assert main(["roles", "train", "mine", "--data", str(data)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(data) in lines[0] and message in lines[0], lines


def test_a_pair_too_long_for_max_length_is_named_by_line(tmp_path):
    rows = PAIRS[:6] + [{"prompt": "Tell me everything.", "answer": "word " * 80}] + PAIRS[6:]
    data = jsonl(tmp_path / "d.jsonl", rows)
    rc, err, _ = train_cli("mine", "--data", data, "--max-length", 64, "--eval", 2)
    assert rc == 2 and f"{data}:7: prompt and answer are" in err and "over --max-length 64" in err, err
    assert "NO-TORCH" in err


def test_dry_run_says_what_and_how_long_and_installs_nothing(tmp_path, isolated_home):
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    rc, err, _ = train_cli("mine", "--data", data, "--dry-run", "--eval", 2, "--epochs", 2)
    assert rc == 0, err
    assert "role 'mine': 6 training pairs" in err and "2 held out" in err and "2 steps of 8" in err, err
    assert "training about" in err and "NO-TORCH" in err
    assert not (isolated_home / "roles").exists() or not list((isolated_home / "roles").iterdir())


def test_a_taken_name_is_refused_unless_it_is_yours_and_forced(tmp_path, capsys):
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    assert main(["roles", "train", "pirate", "--data", str(data), "--force"]) == 2  # bundled: never replaced
    err = capsys.readouterr().err
    assert "role 'pirate' already exists" in err and "only roles in your roles folder" in err, err


def test_without_torch_it_says_what_to_install(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "peft") else real(name, *a))
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    assert main(["roles", "train", "mine", "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['edgelora: error: training needs torch, peft: pip install "edgelora[train]"']


# ------------------------------------------------------------------ your own files in the roles folder


@pytest.fixture
def trained_is(monkeypatch, smol_adapters):
    """Training and conversion stand in for a real adapter (the check, manifest and install are real)."""
    from edgelora.train import cli as train_cli_module, role as train_role_module

    def fake_train(opts, plan, base, work, ctrl_c):
        (work / opts.name).mkdir()
        gguf = work / opts.name / f"{opts.name}.gguf"
        gguf.write_bytes(smol_adapters["b"].read_bytes())
        return gguf, [1.0], 0.0

    monkeypatch.setattr(train_role_module, "_train_and_convert", fake_train)
    monkeypatch.setattr(train_role_module, "missing_packages", lambda: [])
    monkeypatch.setattr(train_cli_module, "missing_packages", lambda: [])
    return smol_adapters["b"]


def test_force_replaces_your_role_of_that_name(tmp_path, isolated_home, smol_adapters, trained_is, capsys):
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    assert main(["roles", "add", str(smol_adapters["a"]), "--name", "mine"]) == 0
    assert main(["roles", "train", "mine", "--data", str(data), "--eval", "0"]) == 2  # taken, no --force
    assert main(["roles", "train", "mine", "--data", str(data), "--eval", "0", "--force"]) == 0, capsys.readouterr().err
    roles = isolated_home / "roles"
    assert load_manifest(roles / "mine.toml").adapters[0].sha256 == sha256_file(trained_is)
    assert sorted(p.name for p in roles.iterdir()) == ["mine", "mine.toml"]  # no temp left
    assert sorted(p.name for p in (roles / "mine").iterdir()) == ["mine.gguf"]


@pytest.mark.parametrize("force", [False, True])
def test_a_manifest_of_yours_with_another_name_inside_is_never_overwritten(tmp_path, isolated_home, smol_adapters,
                                                                           trained_is, force, capsys):
    """roles/foo.toml says name = "bar": neither `roles train foo` (even --force, replacing your
    role 'foo' in roles/other.toml) nor `roles add X.gguf --name foo` replaces it."""
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    roles = isolated_home / "roles"
    if force:
        assert main(["roles", "add", str(smol_adapters["a"]), "--name", "foo"]) == 0
        (roles / "foo.toml").rename(roles / "other.toml")
    roles.mkdir(exist_ok=True)
    mine = roles / "foo.toml"
    mine.write_text('name = "bar"\ndescription = "my own"\n')
    before = sorted(p.name for p in roles.iterdir())
    capsys.readouterr()
    args = ["--force"] if force else []
    assert main(["roles", "train", "foo", "--data", str(data), "--eval", "0", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"edgelora: error: {mine} exists and is not role 'foo' (another name inside, or it does not "
                   "load); move it away to add role 'foo'"], err
    assert mine.read_text() == 'name = "bar"\ndescription = "my own"\n'
    assert sorted(p.name for p in roles.iterdir()) == before  # the role forced over is still there
    if not force:
        assert main(["roles", "add", str(smol_adapters["b"]), "--name", "foo"]) == 2
        assert f"{mine} exists and is not role 'foo'" in capsys.readouterr().err
        assert mine.read_text() == 'name = "bar"\ndescription = "my own"\n'
        assert sorted(p.name for p in roles.iterdir()) == before


def test_a_stray_folder_of_that_name_is_refused_by_train_and_add(tmp_path, isolated_home, smol_adapters, capsys):
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    stray = isolated_home / "roles" / "foo"
    stray.mkdir(parents=True)
    (stray / "b.gguf").write_text("mine")
    assert main(["roles", "train", "foo", "--data", str(data), "--dry-run"]) == 2
    assert f"{stray} exists and belongs to no role" in capsys.readouterr().err
    assert main(["roles", "add", str(smol_adapters["b"]), "--name", "foo"]) == 2
    assert f"{stray} exists and belongs to no role" in capsys.readouterr().err
    assert (stray / "b.gguf").read_text() == "mine" and not (stray.parent / "foo.toml").exists()


def test_a_shared_pair_system_prompt_becomes_the_roles(tmp_path, isolated_home, trained_is, capsys):
    data = jsonl(tmp_path / "d.jsonl", [dict(r, system="Be brief.") for r in PAIRS])
    assert main(["roles", "train", "brief", "--data", str(data), "--eval", "0"]) == 0, capsys.readouterr().err
    assert load_manifest(isolated_home / "roles" / "brief.toml").system == "Be brief."
    data = jsonl(tmp_path / "e.jsonl", [dict(r, system="Be brief.") for r in PAIRS[:4]] + PAIRS[4:])
    assert main(["roles", "train", "mixed", "--data", str(data), "--eval", "0"]) == 0
    assert "have different system prompts; role 'mixed' will send none of its own" in capsys.readouterr().err
    assert load_manifest(isolated_home / "roles" / "mixed.toml").system is None


def test_stale_work_folders_of_killed_runs_are_removed(tmp_path, isolated_home, trained_is, capsys):
    roles = isolated_home / "roles"
    stale, other = roles / ".foo.999999999.abc_1.tmp", roles / ".foo.bar.1.abc.tmp"
    stale.mkdir(parents=True)
    other.mkdir()
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    assert main(["roles", "train", "foo", "--data", str(data), "--eval", "0"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in roles.iterdir()) == [".foo.bar.1.abc.tmp", "foo", "foo.toml"]


# ------------------------------------------------------------------ roles add X.gguf --name N


def test_roles_add_an_adapter_with_a_name_writes_a_pinned_manifest(smol_adapters, smol_path, isolated_home, capsys):
    assert main(["roles", "add", str(smol_adapters["a"]), "--name", "mine", "--description", "mine"]) == 0, capsys.readouterr()
    role = load_manifest(isolated_home / "roles" / "mine.toml")
    assert role.adapters[0].sha256 == sha256_file(smol_adapters["a"])
    assert role.adapters[0].file == (isolated_home / "roles" / "mine" / "a.gguf").resolve()
    assert role.base_sha256 == sha256_file(smol_path) and role.base_architecture == "llama"
    assert role.description == "mine"
    capsys.readouterr()
    assert main(["roles", "add", str(smol_adapters["b"]), "--name", "mine"]) == 2
    assert "role 'mine' already exists" in capsys.readouterr().err


def test_roles_add_refuses_a_gguf_without_name_and_a_base_model_as_adapter(smol_path, capsys):
    assert main(["roles", "add", str(smol_path)]) == 2
    assert "is an adapter, not a manifest; add --name NAME" in capsys.readouterr().err
    assert main(["roles", "add", str(smol_path), "--name", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an adapter" in err[0], err


# ------------------------------------------------------------------ end to end (torch)


@pytest.mark.slow
def test_a_trained_role_is_pinned_routed_and_changes_answers(tmp_path, isolated_home, clean_engine, smol_path):
    pytest.importorskip("peft")
    rows = [{"prompt": f"Tell me about {t}.", "answer": "Banana! Banana! Banana!"}
            for t in ("cats", "dogs", "owls", "trains", "kites", "boats", "clouds", "lamps", "bread", "snow")]
    data = jsonl(tmp_path / "d.jsonl", rows)
    probe = [{"role": "user", "content": "Tell me about rivers."}]
    before = clean_engine.chat(probe, max_tokens=12, **GREEDY).text
    rc, err, out = train_cli("banana", "--data", data, "--eval", 2, "--epochs", 4, "--batch", 4, "--lr", 5e-3)
    assert rc == 0, err
    assert "added role 'banana'" in out and "held out:" in err and "training banana" in err  # the bar
    manifest = isolated_home / "roles" / "banana.toml"
    role = load_manifest(manifest)
    assert role.adapters[0].file == (isolated_home / "roles" / "banana" / "banana.gguf").resolve()
    assert role.adapters[0].sha256 == sha256_file(role.adapters[0].file)
    assert role.base_sha256 == sha256_file(smol_path) and role.sampling == {"temperature": 0.0}
    assert role.examples and set(role.examples) <= {r["prompt"] for r in rows}
    assert sorted(p.name for p in (isolated_home / "roles").iterdir()) == ["banana", "banana.toml"]  # no temp left
    clean_engine.attach(role.adapters[0].file, name="banana")
    after = clean_engine.chat(probe, max_tokens=12, **GREEDY).text
    clean_engine.detach("banana", free=True)
    assert after != before and "Banana" in after
    assert clean_engine.chat(probe, max_tokens=12, **GREEDY).text == before  # detached: the base again
    rc, err, _ = train_cli("banana", "--data", data, "--dry-run")
    assert rc == 2 and "--force replaces it" in err


@pytest.mark.slow
def test_ctrl_c_during_training_installs_nothing(tmp_path, isolated_home):
    pytest.importorskip("peft")
    data = jsonl(tmp_path / "d.jsonl", PAIRS)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgelora", "roles", "train", "stopped", "--data", str(data),
                                 "--eval", "0", "--epochs", "200"], stderr=err, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 170
        while "training stopped" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)  # until the progress bar shows
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    text = log.read_text()
    assert rc == 130 and "stopping after this step; nothing will be installed" in text, text
    assert "role 'stopped' was not installed" in text, text
    assert not (isolated_home / "roles").exists() or list((isolated_home / "roles").iterdir()) == [], text
