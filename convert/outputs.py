"""Writing a file the user named: refuse targets that would destroy something, then write atomically.

One rule for every command that writes a user's file (`convert -o`, `history export -o`, `export --to`,
`adapters sign`): the base and other protected files are never replaced, nothing that is not a regular
file is replaced (a FIFO would block, /dev/null would be swapped for a file), and an existing file
that is not an earlier output of the same command is replaced only with ``--force``. The write goes
to a temp file beside the target, renamed over it at the end: a killed run leaves the old file.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import ConvertError

FORCE_HINT = "pass --force to replace it"


def check_target(out: Path, flag: str, *, is_ours: Callable[[Path], bool], ours: str, force: bool = False,
                 protected: Iterable[tuple[Path, str]] = (), hint: str = FORCE_HINT) -> None:
    """Raise ConvertError unless ``out`` may be written. ``is_ours(out)``: the existing regular file is
    an earlier output (described by ``ours``, e.g. "a GGUF LoRA adapter"); ``protected``: (path, what)
    pairs never replaced, even with ``force``."""
    where = f"{flag} {out}" if flag else str(out)
    try:
        st = os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:  # a name too long, a loop
        raise ConvertError(f"{where}: {exc.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ConvertError(f"{where} is a folder" + ("; give a file name" if flag else "; move it away"))
    parent = out.parent
    if not os.path.isdir(parent):
        raise ConvertError(f"{where}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConvertError(f"{where}: folder {parent} is not writable")
    if st is None:
        return
    target = Path(os.path.realpath(out))  # realpath: a symlink loop is no error here
    for path, what in protected:
        path = Path(os.path.realpath(path))
        if target == path or path in target.parents:
            raise ConvertError(f"{where} is {what}; refusing to overwrite it")
    try:
        mode = os.stat(out).st_mode
    except OSError as exc:  # a broken symbolic link, a loop
        raise ConvertError(f"{where} exists but cannot be checked ({exc.strerror}); move it away") from None
    if not stat.S_ISREG(mode):
        raise ConvertError(f"{where} exists and is not a regular file; refusing to replace it")
    if not force and not is_ours(out):
        raise ConvertError(f"{where} exists and is not {ours}; {hint}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (one that is not ours to signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def stale_temps(out: Path) -> list[Path]:
    """Temps (files or folders) of interrupted writes to ``out`` whose process is gone: exactly the
    names mkstemp/mkdtemp give them, '.OUT.PID.RANDOM.tmp' (another output's '.OUT.2024.PID.RANDOM.tmp'
    does not match, so its pid is never misread)."""
    own = re.compile(rf"^\.{re.escape(out.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp$")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    return [out.parent / n for n in sorted(names) if (m := own.match(n)) and not pid_alive(int(m.group(1)))]


def clean_stale_temps(out: Path) -> None:
    """Temp files of interrupted writes to the same output (their process is gone)."""
    for tmp in stale_temps(out):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(out: Path, flag: str = "", *, mode: int = 0o666) -> Iterator[Path]:
    """A fresh temp file beside ``out`` (``mode`` less the umask) to write to; renamed over ``out``
    when the block ends, removed if it fails. OS errors become one ConvertError naming ``out``."""
    where = f"{flag} {out}" if flag else str(out)
    tmp = None
    try:
        clean_stale_temps(out)
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)  # mkstemp makes it 0600; the output is an ordinary file
        yield tmp
        os.replace(tmp, out)
    except OSError as exc:
        raise ConvertError(f"{where}: cannot write it ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
