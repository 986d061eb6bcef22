"""Commands that write or read the user's files (issue "Hardening, second pass"): `history export -o`,
`export --to`, `adapters sign` / `keygen`, `roles add`, an unreadable `--adapter`. Each refuses what it
would destroy or hang on with one line and exit 2, and replaces only its own earlier outputs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgelora.frontends.cli.main import main
from edgelora.files import sha256_file
from edgelora.conversation.history import History
from edgelora.roles.manifest import bundled_dir

from .conftest import write_role

HUGE = str(2**70)


def run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "edgelora", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-400:])
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in result.stderr, result.stderr


def cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


def make_device(path: Path, major_minor=(1, 3)) -> Path:
    """A character device node (like /dev/null) inside the test folder, so nothing real is at risk."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(*major_minor))
    except (PermissionError, OSError):
        pytest.skip("cannot make a device node here (needs CAP_MKNOD)")
    return path


@pytest.fixture
def tiny_default(isolated_home, tiny, tmp_path):
    """A copy of the tiny base as the configured default model (the file an export must never replace)."""
    base = tmp_path / "base.gguf"
    shutil.copy(tiny["base"], base)
    (isolated_home / "config.toml").write_text(f'default_model = "{base}"\n')
    return base


@pytest.fixture
def conversation(isolated_home):
    h = History()
    cid = h.new()
    h.add(cid, "user", "Name a colour.")
    h.add(cid, "assistant", "Blue.")
    h.close()
    return cid


# 3 -------------------------------------------------------------------------- history export -o
def test_history_export_replaces_only_its_own_earlier_exports(conversation, tiny_default, tmp_path, capsys):
    out = tmp_path / "chat.md"
    assert cli(capsys, "history", "export", str(conversation), "-o", str(out))[0] == 0
    assert "**Assistant**:" in out.read_text() and "Blue." in out.read_text()
    assert cli(capsys, "history", "export", str(conversation), "-o", str(out))[0] == 0  # its own: replaced

    base_sha = sha256_file(tiny_default)
    notes = tmp_path / "notes.md"
    notes.write_text("mine")
    fifo = tmp_path / "pipe.md"
    os.mkfifo(fifo)
    for target, words in ((tiny_default, "is the base model"), (notes, "is not an earlier history export; pass --force"),
                          (fifo, "not a regular file"), (tmp_path, "is a folder")):
        rc, err = cli(capsys, "history", "export", str(conversation), "-o", str(target))
        assert rc == 2 and words in err and err.count("\n") == 1, err
    rc, err = cli(capsys, "history", "export", str(conversation), "-o", str(tiny_default), "--force")
    assert rc == 2 and "is the base model" in err  # the configured base, even with --force
    assert sha256_file(tiny_default) == base_sha and notes.read_text() == "mine" and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert cli(capsys, "history", "export", str(conversation), "-o", str(notes), "--force")[0] == 0
    assert "Blue." in notes.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_history_export_never_replaces_a_device_or_the_history_itself(conversation, isolated_home, tmp_path, capsys):
    null = make_device(tmp_path / "null")
    for target in (null, isolated_home / "history.sqlite3"):
        for force in ([], ["--force"]):
            rc, err = cli(capsys, "history", "export", str(conversation), "-o", str(target), *force)
            assert rc == 2 and err.count("\n") == 1, err
    assert stat.S_ISCHR(os.lstat(null).st_mode)
    assert [m.content for m in History().messages(conversation)] == ["Name a colour.", "Blue."]


# 15 ------------------------------------------------------------------------- one line, not a traceback
def test_history_export_to_a_missing_folder_or_a_huge_id_is_one_line(conversation, tmp_path):
    one_line(run("history", "export", "1", "-o", str(tmp_path / "nope" / "x.md")), "does not exist")
    one_line(run("history", "export", HUGE), f"no conversation {HUGE}")
    one_line(run("history", "export", HUGE, "-o", str(tmp_path / "x.md")), f"no conversation {HUGE}")


def test_chat_resume_of_a_huge_id_is_one_line(isolated_home):
    one_line(run("chat", "--resume", HUGE), f"no conversation {HUGE}")


def test_ask_with_an_adapter_it_cannot_read_is_one_line(tmp_path):
    if os.geteuid() != 0:
        unreadable = tmp_path / "locked.gguf"
        shutil.copy(bundled_dir() / "pirate.gguf", unreadable)
        unreadable.chmod(0)
    else:  # root reads any mode-000 file; a write-only sysctl is a regular file even root cannot open for reading
        unreadable = Path("/proc/sys/vm/compact_memory")
        try:
            os.close(os.open(unreadable, os.O_RDONLY))
            pytest.skip("running as root with no regular file root cannot read")
        except PermissionError:
            pass
        except OSError:
            pytest.skip(f"{unreadable} is not there")
    one_line(run("ask", "hi", "--adapter", str(unreadable), "--max-tokens", "2", timeout=120),
             str(unreadable), "cannot read it")


def test_roles_add_with_a_300_character_name_is_one_line(isolated_home, tmp_path):
    manifest = write_role(tmp_path / "m", "long", bundled_dir() / "pirate.gguf")
    manifest = manifest.rename(manifest.with_name("long-name.toml"))
    manifest.write_text(manifest.read_text().replace('name = "long"', f'name = "{"r" * 300}"'))
    one_line(run("roles", "add", str(manifest)), "a role name may have at most")
    assert not (isolated_home / "roles").exists() or not list((isolated_home / "roles").iterdir())


# 9 -------------------------------------------------------------------------- adapters sign / keygen
@pytest.fixture
def signing(tmp_path):
    key = tmp_path / "k.pem"
    assert run("adapters", "keygen", str(key)).returncode == 0
    adapter = tmp_path / "x.gguf"
    shutil.copy(bundled_dir() / "pirate.gguf", adapter)
    return adapter, key


def test_sign_refuses_fifos_and_devices_instead_of_hanging(signing, tmp_path):
    adapter, key = signing
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")  # an endless file, as `adapters sign /dev/zero` would read
    one_line(run("adapters", "sign", str(fifo), "--key", str(key), timeout=20), "not a regular file")
    one_line(run("adapters", "sign", str(adapter), "--key", str(fifo), timeout=20), "not a regular file")
    one_line(run("adapters", "sign", str(zero), "--key", str(key), timeout=20), "not a regular file")
    assert not list(tmp_path.glob("*.sig"))


def test_sign_and_keygen_targets_in_the_way_are_one_line(signing, tmp_path):
    adapter, key = signing
    (tmp_path / "x.gguf.sig").mkdir()
    one_line(run("adapters", "sign", str(adapter), "--key", str(key)), "x.gguf.sig is a folder")
    (tmp_path / "x.gguf.sig").rmdir()
    (tmp_path / "x.gguf.sig").write_text("my notes")
    one_line(run("adapters", "sign", str(adapter), "--key", str(key)), "is not a signature")
    assert (tmp_path / "x.gguf.sig").read_text() == "my notes"
    (tmp_path / "x.gguf.sig").unlink()
    assert run("adapters", "sign", str(adapter), "--key", str(key)).returncode == 0
    assert run("adapters", "sign", str(adapter), "--key", str(key)).returncode == 0  # its own signature: replaced
    one_line(run("adapters", "keygen", str(tmp_path / "nope" / "k.pem")), "cannot create the key file")
    (tmp_path / "dangling.pem").symlink_to(tmp_path / "nowhere")
    one_line(run("adapters", "keygen", str(tmp_path / "dangling.pem")), "already exists")
    one_line(run("adapters", "keygen", str(tmp_path / ("k" * 300))), "cannot create the key file")


# 4 -------------------------------------------------------------------------- export --to
def test_export_keeps_a_users_own_peft_folder_roles_json_and_launch_script(tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(bundled_dir() / "terse", out / "terse")  # the user's own PEFT folder, not an export
    before = sha256_file(out / "terse" / "adapter_model.safetensors")
    rc, err = cli(capsys, "export", "terse", "--to", str(out))
    assert rc == 2 and "is a PEFT folder an earlier export did not write; pass --force" in err and err.count("\n") == 1
    shutil.rmtree(out / "terse")
    for name in ("roles.json", "launch-vllm.sh"):
        (out / name).write_text("mine\n")
        rc, err = cli(capsys, "export", "terse", "--to", str(out))
        assert rc == 2 and f"{name} exists and is not an earlier export's" in err and err.count("\n") == 1, err
        assert (out / name).read_text() == "mine\n"
        (out / name).unlink()
    assert sorted(p.name for p in out.iterdir()) == []  # refused before anything was written

    shutil.copytree(bundled_dir() / "terse", out / "terse")
    (out / "roles.json").write_text("mine\n")
    assert cli(capsys, "export", "terse", "--to", str(out), "--force")[0] == 0
    assert json.loads((out / "roles.json").read_text())["format"] == "edgelora-export/1"
    assert sha256_file(out / "terse" / "adapter_model.safetensors") == before  # terse is exported from that source
    assert cli(capsys, "export", "terse", "--to", str(out))[0] == 0  # an earlier export: replaced without --force


def test_export_never_replaces_a_roles_own_files_even_with_force(tmp_path, capsys):
    rc, err = cli(capsys, "export", "terse", "--to", str(bundled_dir()), "--force")
    assert rc == 2 and "the PEFT source of role 'terse'" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_export_to_a_folder_it_cannot_make_is_one_line(tmp_path, where):
    if where == "under a file":
        (tmp_path / "afile").write_text("x")
        to = tmp_path / "afile" / "out"
    elif os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        to = tmp_path / "ro" / "out"
    else:  # root writes into mode-555 folders; sysfs takes no new folder even from root
        to = Path("/sys/edgelora-export-test")
    one_line(run("export", "terse", "--to", str(to)), f"--to {to}: cannot create the folder")


# 17 ------------------------------------------------------------------------- export scales, as ask's
@pytest.mark.parametrize("spec, words", [
    ("pirate:1e30", "from -4 to 4"),
    ("pirate:nan", "must be a finite number"),
    ("pirate:-inf+terse", "must be a finite number"),
    ("pirate:4+pirate:4", "role 'pirate' is given twice"),
])
def test_export_refuses_the_scales_ask_refuses_before_converting(tmp_path, spec, words):
    out = tmp_path / "export"
    r = run("export", spec, "--to", str(out))
    one_line(r, words)
    assert "Warning" not in r.stderr and not out.exists()


# 21.10 ---------------------------------------------------------------------- export: manifests, HF base of stacks
def test_export_takes_a_manifest_path_as_ask_does(tmp_path, capsys):
    manifest = write_role(tmp_path / "mine", "halfterse", bundled_dir() / "terse.gguf", scale=0.5)
    out = tmp_path / "export"
    assert cli(capsys, "export", str(manifest), "--to", str(out))[0] == 0
    assert list(json.loads((out / "roles.json").read_text())["roles"]) == ["halfterse"]


def test_a_stacks_peft_config_names_the_hf_base(tmp_path, capsys):
    out = tmp_path / "export"
    assert cli(capsys, "export", "pirate:0.7+terse:0.3", "--to", str(out))[0] == 0
    config = json.loads((out / "pirate@0.7+terse@0.3" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["base_model_name_or_path"] == json.loads((out / "roles.json").read_text())["base"]["hf"]


# review 4 -------------------------------------------------------------- a role twice, whatever its weight's spelling
@pytest.mark.parametrize("second", ["pirate:-0.5", "pirate:1e0"])
def test_a_role_given_twice_is_refused_whatever_its_weight_looks_like(tmp_path, second):
    one_line(run("ask", "--role", "pirate", "--role", second, "hi", "--no-log"), "role 'pirate' is given twice")
    one_line(run("export", f"pirate+{second}", "--to", str(tmp_path / "export")), "role 'pirate' is given twice")
    assert not (tmp_path / "export").exists()


def test_a_manifest_path_with_a_negative_weight_is_its_role(tmp_path, capsys):
    manifest = write_role(tmp_path / "mine", "halfterse", bundled_dir() / "terse.gguf", scale=0.5)
    one_line(run("ask", "--role", f"{manifest}:-0.5", "--role", "halfterse", "hi", "--no-log"),
             "role 'halfterse' is given twice")
    out = tmp_path / "export"
    assert cli(capsys, "export", f"{manifest}:-0.5", "--to", str(out))[0] == 0
    assert list(json.loads((out / "roles.json").read_text())["roles"]) == ["halfterse:-0.5"]


# review 8 ------------------------------------------------------------------------- a ':' in a manifest's folder
def test_a_manifest_path_with_a_colon_in_a_folder_name_is_the_path_not_a_weight(tmp_path, capsys):
    manifest = write_role(tmp_path / "a:b", "halfterse", bundled_dir() / "terse.gguf", scale=0.5)
    asked = run("ask", "--role", str(manifest), "hi", "--no-log", "--max-tokens", "4")
    assert asked.returncode == 0 and "Traceback" not in asked.stderr, asked.stderr[-400:]
    out = tmp_path / "export"
    assert cli(capsys, "export", str(manifest), "--to", str(out))[0] == 0
    assert list(json.loads((out / "roles.json").read_text())["roles"]) == ["halfterse"]
