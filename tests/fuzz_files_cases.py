"""Child process of test_fuzz_files.py: the commands that write user files, run in-process through
the CLI entry point against generated hostile targets. One JSON line per case on stdout.

    python -m tests.fuzz_files_cases SEED N WORK TINY_BASE

A case that blocks is stopped by an alarm (a FIFO opened for reading or writing blocks forever);
an address-space limit turns an endless read (/dev/zero) into a MemoryError instead of a dead machine."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import stat
import sys
import traceback
from pathlib import Path

CASE_TIMEOUT_S = 5
KINDS = ["fifo", "device", "zero", "base", "foreign", "foreign-dir", "foreign-peft", "dangling", "loop",
         "missing-parent", "under-file", "long-name", "folder"]
NEVER_CHANGED = {"fifo", "device", "zero", "base", "foreign-dir", "dangling", "loop", "folder"}  # even --force keeps these
# where a command takes a hostile path: (command, slot, kinds that make sense there)
SLOTS = [
    ("history", "-o", KINDS),
    ("convert", "-o", KINDS),
    ("keygen", "path", KINDS),
    ("sign", "file", ["fifo", "zero", "device", "dangling", "loop", "folder", "long-name", "missing-parent"]),
    ("sign", "key", ["fifo", "zero", "device", "base", "foreign", "dangling", "loop", "folder"]),
    ("sign", "sig", ["fifo", "device", "zero", "base", "foreign", "foreign-dir", "dangling", "loop", "folder"]),
    ("export", "to", ["fifo", "device", "base", "foreign", "dangling", "loop", "missing-parent", "under-file", "long-name"]),
    ("export", "folder", ["fifo", "device", "base", "foreign", "foreign-dir", "foreign-peft", "dangling", "loop"]),
    ("export", "roles.json", ["fifo", "device", "zero", "base", "foreign", "foreign-dir", "dangling", "loop", "folder"]),
    ("export", "launch-vllm.sh", ["fifo", "device", "zero", "base", "foreign", "foreign-dir", "dangling", "loop", "folder"]),
]
FORCEABLE = {"history", "convert", "export"}


class Hang(Exception):
    pass


def on_alarm(signum, frame):
    raise Hang()


def make(kind: str, path: Path, shared: Path) -> Path:
    """Build a hostile ``kind`` at ``path``; return the path to hand to the command."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind in ("device", "zero"):
        minor = 3 if kind == "device" else 5  # /dev/null, /dev/zero
        try:
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
        except OSError:
            path.symlink_to("/dev/null" if minor == 3 else "/dev/zero")
    elif kind == "base":
        path.symlink_to(shared / "base.gguf")
    elif kind == "foreign":
        path.write_text("the user's own file\n")
    elif kind == "foreign-dir":
        path.mkdir()
        (path / "notes.txt").write_text("mine\n")
    elif kind == "foreign-peft":
        shutil.copytree(shared / "peft", path)
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "loop":
        path.symlink_to(path.with_name(path.name + "-b"))
        path.with_name(path.name + "-b").symlink_to(path)
    elif kind == "missing-parent":
        return path.parent / "nope" / path.name
    elif kind == "under-file":
        (path.parent / "afile").write_text("x\n")
        return path.parent / "afile" / path.name
    elif kind == "long-name":
        return path.with_name("n" * 300)
    elif kind == "folder":
        path.mkdir()
    return path


def build_case(i: int, rng: random.Random, shared: Path, case: Path) -> list[str]:
    command, slot, kinds = rng.choice(SLOTS)
    kind = rng.choice(kinds)
    force = command in FORCEABLE and kind in NEVER_CHANGED and rng.random() < 0.5
    if command == "history":
        args = ["history", "export", "1", "-o", str(make(kind, case / "chat.md", shared))]
    elif command == "convert":
        target = shared / "base.gguf" if kind == "base" else make(kind, case / "out.gguf", shared)
        args = ["convert", str(shared / "peft"), "--base", str(shared / "base.gguf"), "-o", str(target)]
    elif command == "keygen":
        args = ["adapters", "keygen", str(make(kind, case / "k.pem", shared))]
    elif command == "sign":
        file, key = case / "x.gguf", shared / "k.pem"
        if slot == "file":
            file = make(kind, file, shared)
        else:
            shutil.copy(shared / "x.gguf", file)
            if slot == "key":
                key = make(kind, case / "key.pem", shared)
            else:
                make(kind, case / "x.gguf.sig", shared)
        args = ["adapters", "sign", str(file), "--key", str(key)]
    else:
        to = case / "out"
        if slot == "to":
            to = make(kind, to, shared)
        else:
            make(kind, to / ("one" if slot == "folder" else slot), shared)
        args = ["export", "one", "--to", str(to), "--role-dir", str(shared / "roles")]
    return [command, slot, kind, *args, *(["--force"] if force else [])]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (links not followed): what it is and what it holds."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    what = hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            else:
                what = st.st_rdev
            seen[p] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_mtime_ns, what)
    return seen


def run_case(argv: list[str]) -> tuple[str, int | None, str]:
    from edgelora.frontends.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    signal.alarm(CASE_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except Hang:
        return "hang", None, err.getvalue()
    except BaseException:  # noqa: BLE001 - anything escaping main is what the user would see as a traceback
        return "traceback", None, traceback.format_exc(limit=3)
    finally:
        signal.alarm(0)
    text = err.getvalue()
    if "Traceback" in text or rc not in (0, 2) or (rc == 2 and text.count("\n") != 1):
        return "bad-exit", rc, text
    return ("ok" if rc == 0 else "refused"), rc, text


def setup(work: Path, tiny_base: Path) -> Path:
    from edgelora.bench.run import write_synthetic_peft
    from edgelora.convert import convert_peft
    from edgelora.conversation.history import History
    from edgelora.safety.signing import keygen

    shared = work / "shared"
    (shared / "roles").mkdir(parents=True)
    shutil.copy(tiny_base, shared / "base.gguf")
    write_synthetic_peft(shared / "peft", shared / "base.gguf", rank=2)
    convert_peft(shared / "peft", shared / "base.gguf", shared / "x.gguf")
    from edgelora.files import sha256_file

    (shared / "roles" / "one.toml").write_text(
        f'name = "one"\ndescription = "d"\n[[adapters]]\nfile = "{shared / "x.gguf"}"\n'
        f'sha256 = "{sha256_file(shared / "x.gguf")}"\nscale = 0.5\n')
    keygen(shared / "k.pem")
    Path(os.environ["EDGELORA_CONFIG"]).write_text(f'default_model = "{shared / "base.gguf"}"\n')
    h = History()
    h.add(h.new(), "user", "hello")
    h.close()
    return shared


def main() -> None:
    seed, n, work, tiny_base = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, hard))  # an endless read fails instead of eating the machine
    signal.signal(signal.SIGALRM, on_alarm)
    shared = setup(work, tiny_base)
    rng = random.Random(seed)
    for i in range(n):
        case = work / f"case{i}"
        case.mkdir()
        command, slot, kind, *argv = build_case(i, rng, shared, case)
        before = {**snapshot(shared), **snapshot(case)}
        outcome, rc, text = run_case(argv)
        after = {**snapshot(shared), **snapshot(case)}
        changed = sorted(p for p, v in before.items() if after.get(p) != v)
        if changed and outcome in ("ok", "refused"):
            outcome = "changed"
        print(json.dumps({"i": i, "command": command, "slot": slot, "kind": kind, "force": "--force" in argv,
                          "outcome": outcome, "rc": rc, "stderr": text[-600:], "changed": changed[:3]}), flush=True)


if __name__ == "__main__":
    main()
