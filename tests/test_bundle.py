"""`edgelora bundle` refusals (one line, exit 2, nothing left behind) and the target-side placing of
models and roles. The offline build-install-use run is tests/test_bundle_offline.py (slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from edgelora.safety import signing
from edgelora.config import load_config
from edgelora.files import sha256_file
from edgelora.models.catalog import resolve_model
from edgelora.offline import place
from edgelora.roles.manifest import load_manifest
from edgelora.roles.store import install_role

from .conftest import write_role


def bundle_cli(*args):
    return subprocess.run([sys.executable, "-m", "edgelora", "bundle", *args], capture_output=True, text=True,
                          timeout=120)


def one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith("[")]  # "[  0.1 s] step" progress
    assert len(lines) == 1 and lines[0].startswith("edgelora: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def nothing_left(folder: Path, name: str):
    assert [p.name for p in folder.iterdir() if p.name.startswith(name)] == []


@pytest.mark.parametrize("value", ["2.7x", "3", "three", "3.11.2"])
def test_bad_python_version_is_refused(tmp_path, value):
    one_line_error(bundle_cli(str(tmp_path / "b"), "--python", value), "--python", value)
    nothing_left(tmp_path, "b")


def test_unknown_model_and_role_are_named(tmp_path):
    one_line_error(bundle_cli(str(tmp_path / "b"), "--model", str(tmp_path / "nope.gguf")), "--model", "nope.gguf")
    one_line_error(bundle_cli(str(tmp_path / "b"), "--role", "nosuchrole"), "--role", "nosuchrole")
    nothing_left(tmp_path, "b")


def test_an_adapter_is_not_a_base_model(tmp_path, smol_adapters):
    one_line_error(bundle_cli(str(tmp_path / "b"), "--model", str(smol_adapters["a"])), "--model", "adapter")


def test_existing_out_needs_force(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mine.txt").write_text("keep me")
    one_line_error(bundle_cli(str(tmp_path / "b")), str(tmp_path / "b"), "--force")
    assert (tmp_path / "b" / "mine.txt").read_text() == "keep me"


def test_missing_parent_folder_is_named(tmp_path):
    one_line_error(bundle_cli(str(tmp_path / "no" / "b")), str(tmp_path / "no"))


def test_role_with_a_wrong_pin_fails_before_any_download_and_leaves_nothing(tmp_path, isolated_home, smol_adapters):
    write_role(isolated_home / "roles", "broken", smol_adapters["a"], sha="0" * 64)
    proc = bundle_cli(str(tmp_path / "b.tar.gz"), "--role", "broken")
    line = one_line_error(proc, str(smol_adapters["a"]), "sha256")
    assert "fetching" not in proc.stderr and "building" not in proc.stderr, proc.stderr  # failed before the wheels
    nothing_left(tmp_path, "b")
    assert line


# ---------------------------------------------------------------- target side: place.py


def fake_bundle(tmp_path, model: Path, role_manifest: Path | None) -> Path:
    """A bundle's models/, roles/ and bundle.json, as build.py writes them (no wheels: place.py
    runs after pip)."""
    b = tmp_path / "bundle"
    (b / "models").mkdir(parents=True)
    shutil.copyfile(model, b / "models" / "tiny-llama.gguf")
    info = {"models": [{"name": "tiny-llama", "file": "models/tiny-llama.gguf", "sha256": sha256_file(model)}],
            "roles": {"bundled": ["pirate"], "user": []}}
    if role_manifest:
        install_role(load_manifest(role_manifest), b / "roles")
        info["roles"]["user"].append({"name": "mine", "manifest": "roles/mine.toml"})
    (b / "bundle.json").write_text(json.dumps(info))
    return b


def test_place_puts_models_and_roles_where_edgelora_finds_them(tmp_path, isolated_home, tiny, smol_adapters):
    src = write_role(tmp_path / "src", "mine", smol_adapters["a"])
    b = fake_bundle(tmp_path, tiny["base"], src)
    (isolated_home / "config.toml").write_text("threads = 2\n")
    lines = []
    place.place(b, out=lines.append)
    text = "\n".join(lines)
    dest = isolated_home / "models" / "tiny-llama.gguf"
    assert f"{dest} (placed; `-m tiny-llama`)" in text
    assert resolve_model("tiny-llama") == dest  # -m NAME finds it
    assert load_config().default_model == str(dest)  # no embedded default in the bundle: this one is
    assert load_config().threads == 2  # the user's settings kept
    role = load_manifest(isolated_home / "roles" / "mine.toml")
    assert sha256_file(role.adapters[0].file) == sha256_file(smol_adapters["a"])
    assert "pirate (bundled with edgelora" in text

    lines.clear()
    place.place(b, out=lines.append)  # re-run: upgrade in place
    text = "\n".join(lines)
    assert "(unchanged;" in text and "mine.toml (replaced)" in text
    assert "already sets default_model" in text


def test_place_refuses_a_model_that_changed_after_the_check(tmp_path, isolated_home, tiny):
    b = fake_bundle(tmp_path, tiny["base"], None)
    data = bytearray((b / "models" / "tiny-llama.gguf").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "models" / "tiny-llama.gguf").write_bytes(bytes(data))
    assert place.main([str(b)]) == 1
    assert not (isolated_home / "models" / "tiny-llama.gguf").exists()
    assert not any((isolated_home / "models").glob(".*tmp"))


def test_models_dir_does_not_shadow_a_real_path(tmp_path, isolated_home, tiny, monkeypatch):
    (isolated_home / "models").mkdir()
    shutil.copyfile(tiny["base"], isolated_home / "models" / "x.gguf")
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(tiny["merged1"], tmp_path / "x.gguf")
    assert resolve_model("x.gguf") == Path("x.gguf")  # a file here wins
    assert resolve_model("x") == isolated_home / "models" / "x.gguf"


def test_place_warns_when_this_cpu_lacks_what_the_build_cpu_had(tmp_path, isolated_home, tiny):
    b = fake_bundle(tmp_path, tiny["base"], None)
    info = json.loads((b / "bundle.json").read_text())
    here = place.cpu_flags()
    if here is None:
        pytest.skip("no /proc/cpuinfo flags on this OS")
    lines = []
    place.place(b, out=lines.append)  # no cpu_flags recorded: nothing to compare
    assert not any(l.startswith("warning") for l in lines)
    (b / "bundle.json").write_text(json.dumps({**info, "cpu_flags": here}))
    lines.clear()
    place.place(b, out=lines.append)
    assert not any(l.startswith("warning") for l in lines)  # same CPU
    (b / "bundle.json").write_text(json.dumps({**info, "cpu_flags": [*here, "avx9000"]}))
    lines.clear()
    place.place(b, out=lines.append)
    assert lines[0].startswith("warning") and "lacks avx9000," in lines[0] and "Illegal instruction" in lines[0]


def test_runtime_closure_follows_extras_and_markers_and_leaves_the_test_stack_out():
    from edgelora.offline.wheels import runtime_closure

    pins, missing = runtime_closure()
    names = {p.name for p in pins}
    assert {"edgelora", "llama-cpp-python", "numpy", "textual", "gguf", "tokenizers"} <= names
    assert "linkify-it-py" in names  # textual needs markdown-it-py[linkify]: an extra's own requirements
    assert not names & {"torch", "transformers", "peft", "pytest", "openai", "pipx"}  # [test] extras stay out
    assert missing == []
    pins_310, missing_310 = runtime_closure(python="3.10")
    assert "tomli>=2" in missing_310 or "tomli" in {p.name for p in pins_310}  # python_version < '3.11'
    assert "tomli" not in names or sys.version_info < (3, 11)


def test_the_source_copy_skips_bundles_inside_the_tree(tmp_path):
    from edgelora.offline.wheels import _ignore_source

    (tmp_path / "old-bundle").mkdir()
    for f in ("SHA256SUMS", "bundle.json"):
        (tmp_path / "old-bundle" / f).write_text("")
    (tmp_path / "edgelora").mkdir()
    names = ["old-bundle", "edgelora", ".venv", "b.tmp-abc123", "x.tar.gz", "pyproject.toml"]
    assert _ignore_source(str(tmp_path), names) == {"old-bundle", ".venv", "b.tmp-abc123", "x.tar.gz"}


# ---------------------------------------------------------------- OUT: --force, temps, the printed hint


def write_earlier_bundle(folder: Path) -> Path:
    """What `edgelora bundle` leaves at OUT, as far as --force looks: a folder with its bundle.json."""
    folder.mkdir()
    (folder / "bundle.json").write_text(json.dumps({"format": 1, "edgelora": "0.1", "wheels": []}))
    (folder / "SHA256SUMS").write_text("")
    return folder


def test_force_replaces_only_an_earlier_bundle_never_your_folder_or_file(tmp_path, isolated_home, smol_adapters):
    write_role(isolated_home / "roles", "broken", smol_adapters["a"], sha="0" * 64)  # fails after the OUT check
    thesis = tmp_path / "b"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("four years")
    one_line_error(bundle_cli(str(thesis), "--force", "--role", "broken"), str(thesis), "not an edgelora bundle")
    assert (thesis / "thesis.tex").read_text() == "four years"
    notes = tmp_path / "notes.tar.gz"
    notes.write_text("not an archive")
    one_line_error(bundle_cli(str(notes), "--force", "--role", "broken"), str(notes), "not an edgelora bundle")
    assert (thesis / "thesis.tex").read_text() == "four years" and notes.read_text() == "not an archive"


def test_force_recognizes_an_earlier_bundle_folder_or_archive_and_refuses_links(tmp_path):
    from edgelora.offline.build import BundleError, check_out

    old = write_earlier_bundle(tmp_path / "old")
    check_out(old, archive=False, force=True)
    with tarfile.open(tmp_path / "old.tar.gz", "w:gz") as tar:
        tar.add(old, arcname="old")
    check_out(tmp_path / "old.tar.gz", archive=True, force=True)
    (tmp_path / "link").symlink_to(old)
    with pytest.raises(BundleError, match="symbolic link"):
        check_out(tmp_path / "link", archive=False, force=True)
    (old / "bundle.json").write_text('{"title": "my thesis"}')  # a bundle.json that is not ours
    with pytest.raises(BundleError, match="not an edgelora bundle"):
        check_out(old, archive=False, force=True)


def test_sigterm_during_a_build_leaves_no_temp_folder(tmp_path, tiny):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "edgelora", "bundle", str(out), "--model", str(tiny["base"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not [p for p in tmp_path.iterdir() if "tmp" in p.name] and proc.poll() is None:
        assert time.monotonic() < deadline, "no temp folder appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (143, -signal.SIGTERM), err
    assert list(tmp_path.iterdir()) == [], err


def test_a_build_removes_temp_folders_of_dead_builds_only(tmp_path, isolated_home, smol_adapters):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".b.{dead.pid}.x1y2.tmp"
    live = tmp_path / f".b.{os.getpid()}.z3w4.tmp"  # a build still running (this process)
    for folder in (stale, live):
        (folder / "wheels").mkdir(parents=True)
        (folder / "wheels" / "big.whl").write_bytes(b"x" * 1000)
    write_role(isolated_home / "roles", "broken", smol_adapters["a"], sha="0" * 64)
    one_line_error(bundle_cli(str(tmp_path / "b"), "--role", "broken"), "sha256")
    assert not stale.exists() and live.is_dir()


@pytest.mark.parametrize("out, shown", [
    ("dist/bundle", "install it offline: sh dist/bundle/install.sh"),
    ("bundle.tar.gz", "install it offline: tar xzf bundle.tar.gz && sh bundle/install.sh"),
    ("/elsewhere/my bundle", "install it offline: sh '/elsewhere/my bundle/install.sh'"),
])
def test_the_install_hint_works_from_the_current_folder(tmp_path, out, shown):
    from edgelora.offline.build import install_hint

    clone = tmp_path / "clone"
    path = Path(out) if out.startswith("/") else clone / out  # the CLI reports OUT as an absolute path
    assert install_hint(path, cwd=clone) == shown


# ---------------------------------------------------------------- install.sh on a small bundle (seconds)


def mini_bundle(tmp_path: Path) -> Path:
    """install.sh, SHA256SUMS and a few files as build.py writes them; its requirements name a wheel that
    is not there, so a pip that is ever reached fails without installing anything."""
    from edgelora.offline.build import render_install_sh, write_manifest

    b = tmp_path / "mini"
    (b / "wheels").mkdir(parents=True)
    (b / "wheels" / "demo-1.0-py3-none-any.whl").write_bytes(b"demo wheel bytes")
    (b / "requirements.txt").write_text("wheels/absent-1.0-py3-none-any.whl\n")
    (b / "no-deps.txt").write_text("")
    (b / "bundle.json").write_text(json.dumps({"format": 1, "edgelora": "0", "wheels": []}))
    (b / "install.sh").write_text(render_install_sh("%d.%d" % sys.version_info[:2], "0.test"))
    write_manifest(b)
    return b


def install_sh(bundle: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    return subprocess.run(["sh", str(bundle / "install.sh"), *args], env=env, cwd=home, capture_output=True,
                          text=True, timeout=120)


def install_refused(proc, *words):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("install.sh: error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def not_a_venv(tmp_path):
    """A --venv that is no environment: on a build without the check being tested, install.sh stops
    there (after verifying), quickly and without installing anything."""
    folder = tmp_path / "stop"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return folder


def test_install_sh_refuses_symlinks_listed_or_not(tmp_path, not_a_venv):
    b = mini_bundle(tmp_path)
    home = tmp_path / "home"
    (b / "wheels" / "evil-1.0-py3-none-any.whl").symlink_to(b / "wheels" / "demo-1.0-py3-none-any.whl")
    install_refused(install_sh(b, home, "--venv", str(not_a_venv), "--no-bin"),
                    "wheels/evil-1.0-py3-none-any.whl is a symbolic link")
    (b / "wheels" / "evil-1.0-py3-none-any.whl").unlink()
    # a listed file replaced by a link to a copy with the same bytes
    outside = tmp_path / "outside.whl"
    shutil.move(b / "wheels" / "demo-1.0-py3-none-any.whl", outside)
    (b / "wheels" / "demo-1.0-py3-none-any.whl").symlink_to(outside)
    install_refused(install_sh(b, home, "--venv", str(not_a_venv), "--no-bin"),
                    "wheels/demo-1.0-py3-none-any.whl is a symbolic link")
    (b / "wheels" / "demo-1.0-py3-none-any.whl").unlink()
    shutil.move(outside, b / "wheels" / "demo-1.0-py3-none-any.whl")
    (b / "wheels" / "SHA256SUMS").write_text("an unlisted file with a manifest's name")
    install_refused(install_sh(b, home, "--venv", str(not_a_venv), "--no-bin"), "wheels/SHA256SUMS is not in SHA256SUMS")


@pytest.mark.parametrize("damage, words", [
    (lambda text: "", ["SHA256SUMS is empty"]),
    (lambda text: text.replace("\n", "\r\n"), ["SHA256SUMS has Windows (CRLF) line endings"]),
    (lambda text: text.rstrip("\n"), ["SHA256SUMS does not end with a newline"]),
    (lambda text: "nonsense\n" + text, ["SHA256SUMS line 1 is not"]),
])
def test_install_sh_says_what_is_wrong_with_sha256sums_in_one_line(tmp_path, not_a_venv, damage, words):
    b = mini_bundle(tmp_path)
    (b / "SHA256SUMS").write_text(damage((b / "SHA256SUMS").read_text()), newline="")
    install_refused(install_sh(b, tmp_path / "home", "--venv", str(not_a_venv), "--no-bin"), *words)


def test_install_sh_takes_only_a_real_venv_or_an_empty_folder(tmp_path):
    b = mini_bundle(tmp_path)
    home = tmp_path / "home"
    fake = tmp_path / "fake"  # any interpreter of the right version at DIR/bin/python, no pyvenv.cfg
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "python").symlink_to(sys.executable)
    install_refused(install_sh(b, home, "--venv", str(fake), "--no-bin"), str(fake), "not a virtual environment")
    wrapper = tmp_path / "wrapper"  # a pyvenv.cfg, but its bin/python runs an interpreter of somewhere else
    (wrapper / "bin").mkdir(parents=True)
    (wrapper / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (wrapper / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (wrapper / "bin" / "python").chmod(0o755)
    install_refused(install_sh(b, home, "--venv", str(wrapper), "--no-bin"), str(wrapper), "not a virtual environment")
    real = tmp_path / "real"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(real)], check=True)
    proc = install_sh(b, home, "--venv", str(real), "--no-bin")  # accepted; then its missing pip stops it
    assert f"upgrading the existing environment {real}" in proc.stdout, proc.stdout + proc.stderr


def test_install_sh_does_not_replace_your_own_edgelora_command(tmp_path):
    b = mini_bundle(tmp_path)
    home = tmp_path / "home"
    mine = home / ".local" / "bin" / "edgelora"
    mine.parent.mkdir(parents=True)
    mine.write_text("#!/bin/sh\necho my own edgelora\n")
    venv = tmp_path / "venv"
    install_refused(install_sh(b, home, "--venv", str(venv)), str(mine), "--no-bin")
    assert mine.read_text() == "#!/bin/sh\necho my own edgelora\n" and not venv.exists()
    # the link an earlier install made is ours to replace: that check passes (pip, absent here, stops it)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    mine.unlink()
    mine.symlink_to(venv / "bin" / "edgelora")
    proc = install_sh(b, home, "--venv", str(venv))
    assert "already exists" not in proc.stderr and "upgrading the existing environment" in proc.stdout, proc.stderr


# ---------------------------------------------------------------- signed bundles


needs_openssl3 = pytest.mark.skipif(
    not shutil.which("openssl") or not subprocess.run(["openssl", "version"], capture_output=True, text=True)
    .stdout.startswith("OpenSSL 3"), reason="install.sh --trust needs OpenSSL 3")


@needs_openssl3
def test_install_sh_trusts_only_a_sha256sums_signed_by_the_given_key(tmp_path):
    from edgelora.offline.build import write_manifest

    b = mini_bundle(tmp_path)
    home = tmp_path / "home"
    pub = signing.keygen(tmp_path / "key.pem")
    (tmp_path / "key.pub").write_text(pub + "\n")  # what `edgelora adapters keygen KEY.pem > KEY.pub` writes
    install_refused(install_sh(b, home, "--trust", str(tmp_path / "key.pub"), "--check"), "no SHA256SUMS.sig")
    signing.sign(b / "SHA256SUMS", tmp_path / "key.pem")
    ok = install_sh(b, home, "--trust", str(tmp_path / "key.pub"), "--check")
    assert ok.returncode == 0 and "signed by the trusted key" in ok.stdout and "all 5 files match" in ok.stdout, ok.stderr
    assert install_sh(b, home, "--trust", pub, "--check").returncode == 0  # the key itself, not a file
    other = signing.keygen(tmp_path / "other.pem")
    install_refused(install_sh(b, home, "--trust", other, "--check"), "SHA256SUMS.sig does not match the trusted key")
    install_refused(install_sh(b, home, "--trust", "not-a-key", "--check"), "--trust not-a-key")

    # a wheel and SHA256SUMS edited together: the sums agree, the signature does not
    (b / "wheels" / "demo-1.0-py3-none-any.whl").write_bytes(b"tampered wheel")
    write_manifest(b)
    unsigned = install_sh(b, home, "--check")
    assert unsigned.returncode == 0 and "SHA256SUMS.sig not checked" in unsigned.stdout  # what --trust is for
    install_refused(install_sh(b, home, "--trust", str(tmp_path / "key.pub"), "--check"),
                    "SHA256SUMS.sig does not match the trusted key", "nothing was installed")


def test_bundle_sign_names_a_bad_key(tmp_path):
    (tmp_path / "key.pem").write_text("not a key")
    one_line_error(bundle_cli(str(tmp_path / "b"), "--sign", str(tmp_path / "key.pem")), "--sign", "key.pem")
    nothing_left(tmp_path, "b")


def test_temp_cleanup_for_out_b_leaves_the_running_temps_of_out_b_dot_number(tmp_path):
    """OUT 'b.<n>' has temps '.b.<n>.<pid>.<random>.tmp': for OUT 'b' that is not a temp of process <n>."""
    from edgelora.convert.outputs import clean_stale_temps as clean_convert_temps
    from edgelora.offline.build import clean_stale_temps as clean_bundle_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    others = tmp_path / f".b.{dead.pid}.{os.getpid()}.k9q2.tmp"  # OUT b.<dead pid>, built by this live process
    own = tmp_path / f".b.{dead.pid}.x1y2.tmp"  # OUT b, its process gone
    for folder in (others, own):
        folder.mkdir()
    clean_bundle_temps(tmp_path / "b")
    assert others.is_dir() and not own.exists()
    others.rmdir()  # convert's cleanup: the same rule, for files
    for path in (others, own):
        path.write_bytes(b"x")
    clean_convert_temps(tmp_path / "b")
    assert others.is_file() and not own.exists()
    clean_convert_temps(tmp_path / "[b]")  # glob characters in OUT match nothing else
    assert others.is_file()
