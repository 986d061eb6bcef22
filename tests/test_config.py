"""The config commands: `config show` is valid TOML that every command reads back; init, edit, path."""

from __future__ import annotations

import os
import subprocess
import sys

from edgelora._toml import tomllib
from edgelora.config import load_config


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgelora", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_config_show_redirected_into_the_config_file_is_read_by_every_command(isolated_home):
    shown = run_cli("config", "show")
    assert shown.returncode == 0, shown.stderr
    tomllib.loads(shown.stdout)  # valid TOML (main printed `default_model = null`)
    (isolated_home / "config.toml").write_text(shown.stdout)
    assert load_config().as_dict() == load_config(isolated_home / "missing.toml").as_dict()  # the same values
    for args in (["config", "show"], ["roles", "list"], ["models", "list"],
                 ["ask", "hi", "--max-tokens", "2", "--no-log", "--temperature", "0"]):
        result = run_cli(*args)
        assert result.returncode == 0, (args, result.stderr)


def test_config_show_prints_set_values_and_unset_keys_as_commented_examples(isolated_home):
    (isolated_home / "config.toml").write_text('threads = 1\nroles_dirs = ["/tmp/my roles"]\n')
    shown = run_cli("config", "show").stdout
    assert tomllib.loads(shown) == {**tomllib.loads(run_cli("config", "show", env={
        "EDGELORA_CONFIG": str(isolated_home / "none.toml")}).stdout), "threads": 1, "roles_dirs": ["/tmp/my roles"]}
    assert "\n# default_model = " in shown and "\nthreads = 1\n" in shown


def test_config_init_writes_commented_defaults_and_refuses_to_overwrite(isolated_home):
    path = isolated_home / "sub" / "config.toml"
    env = {"EDGELORA_CONFIG": str(path)}
    assert run_cli("config", "path", env=env).stdout.strip() == str(path)
    first = run_cli("config", "init", env=env)
    assert first.returncode == 0, first.stderr
    assert load_config(path).as_dict() == load_config(isolated_home / "missing.toml").as_dict()
    assert "# default_model" in path.read_text()
    path.write_text("threads = 1\n")
    again = run_cli("config", "init", env=env)
    assert again.returncode == 2 and "--force" in again.stderr and str(path) in again.stderr
    assert path.read_text() == "threads = 1\n"  # untouched
    assert run_cli("config", "init", "--force", env=env).returncode == 0
    assert "threads = 1" not in path.read_text()


def test_config_edit_creates_the_file_opens_the_editor_and_checks_the_result(isolated_home, tmp_path):
    path = isolated_home / "config.toml"
    editor = tmp_path / "editor.sh"
    editor.write_text('#!/bin/sh\ngrep -q "# default_model" "$1" && echo "threads = 1" >> "$1"\n')
    editor.chmod(0o755)
    edited = run_cli("config", "edit", env={"VISUAL": str(editor)})
    assert edited.returncode == 0, edited.stderr
    assert load_config(path).threads == 1  # created with the defaults first, then edited
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/bin/sh\necho "threads = \\"many\\"" >> "$1"\n')
    bad.chmod(0o755)
    broken = run_cli("config", "edit", env={"VISUAL": str(bad)})
    assert broken.returncode == 2 and "not valid TOML" in broken.stderr and str(path) in broken.stderr
    none = run_cli("config", "edit", env={"VISUAL": "", "EDITOR": ""})
    assert none.returncode == 2 and "$EDITOR" in none.stderr


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_config_init_removes_temps_of_killed_runs_and_leaves_none_when_the_write_fails(isolated_home, monkeypatch):
    import pytest

    from edgelora.config import ConfigError, config_text, init_config

    path = isolated_home / "conf" / "config.toml"
    path.parent.mkdir()
    stale = path.parent / f".config.toml.{_dead_pid()}.k3j9.tmp"  # a `config init` killed mid-write
    stale.write_text("half")
    assert init_config(path) == path and path.read_text() == config_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]

    def disk_full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(ConfigError, match="config.toml: cannot write it"):
        init_config(path, force=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.toml"]
