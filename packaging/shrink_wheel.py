"""Shrink a llama-cpp-python wheel, and link an installed copy's duplicate libraries.

A wheel cannot hold symlinks, so llama-cpp-python's wheel stores each shared library three times
(libllama.so, libllama.so.0, libllama.so.0.5.0), and again in a top-level lib/ (with include/:
CMake's install tree, which the package never reads). Only two names are used: the plain one,
which llama_cpp opens with ctypes, and the soname, which the other libraries link. ``wheel`` keeps
llama_cpp/ and the dist-info only, drops the fully versioned copies, strips symbols the loader does
not need and rewrites RECORD; ``link`` replaces the plain
name by a symlink to the soname in an installed folder, so each library is on disk (and mapped)
once.

    python shrink_wheel.py wheel IN.whl OUT.whl
    python shrink_wheel.py link SITE/llama_cpp/lib
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

_VERSIONED = re.compile(r"^(lib[^/]+\.so)\.\d+\.\d+\.\d+$")  # libllama.so.0.5.0 (the soname is .so.0)
_SONAME = re.compile(r"^(lib[^/]+\.so)\.\d+$")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _strip(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lib.so"
        path.write_bytes(data)
        subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
        return path.read_bytes()


def shrink(src: Path, dst: Path) -> None:
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for name in names:
                base = name.rsplit("/", 1)[-1]
                top = name.split("/", 1)[0]
                if name == record or _VERSIONED.match(base) or not (top == "llama_cpp" or top.endswith(".dist-info")):
                    continue
                data = zin.read(name)
                if ".so" in base and data[:4] == b"\x7fELF":
                    data = _strip(data)
                zout.writestr(zin.getinfo(name), data)
                lines.append(_record_line(name, data))
            lines.append(f"{record},,")
            zout.writestr(record, "\n".join(lines) + "\n")


def link(lib_dir: Path) -> int:
    """libX.so -> libX.so.N where both are the same bytes. Returns how many were linked."""
    n = 0
    for soname in sorted(lib_dir.iterdir()):
        m = _SONAME.match(soname.name)
        plain = lib_dir / m.group(1) if m else None
        if plain is None or not plain.is_file() or plain.is_symlink():
            continue
        if plain.read_bytes() == soname.read_bytes():
            plain.unlink()
            os.symlink(soname.name, plain)
            n += 1
    return n


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "wheel":
        shrink(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) == 2 and argv[0] == "link":
        print(f"linked {link(Path(argv[1]))} duplicate libraries", file=sys.stderr)
        return 0
    print(__doc__.strip().splitlines()[-2:], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
