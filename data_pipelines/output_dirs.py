"""Outputs written whole (prepared datasets, chat datasets, exports, GGUF files, imported and upcycled
workdirs): filled in a temporary sibling `.NAME.tmp-HOST-PID-XXXXXXXX` and renamed when complete, so an output
is absent or complete.

A writer killed hard (SIGKILL, the OOM killer) cannot remove its sibling. The name says who made it, so the
next writer of the same output removes the siblings of gone processes of its own host; never a live process's,
nor another host's (whose processes it cannot see), nor one of an unknown maker. A dead maker's pid reused by
another process keeps its sibling: the error is always on the side of keeping.
"""

import contextlib
import glob
import logging
import os
import pathlib
import shutil
import socket
import tempfile
from collections.abc import Iterator

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _sibling_prefix(out: pathlib.Path) -> str:
    """What every temporary sibling of `out` is named first; HOST-PID-XXXXXXXX follows."""
    return f".{out.name}.tmp-"


def stale_siblings(out: pathlib.Path) -> list[pathlib.Path]:
    """The temporary siblings of `out` made by processes of this host that are gone, sorted."""
    prefix, host = _sibling_prefix(out), socket.gethostname()
    stale = []
    for path in sorted(out.parent.glob(glob.escape(prefix) + "*")):
        maker = path.name[len(prefix) :].rsplit("-", 2)  # HOST may hold dashes; the random tail holds none
        if len(maker) == 3 and maker[0] == host and maker[1].isdigit() and not pid_alive(int(maker[1])):
            stale.append(path)
    return stale


def _remove_stale_siblings(out: pathlib.Path) -> None:
    for stale in stale_siblings(out):
        log.info("removing %s, left by a killed writer of %s", stale, out)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _maker_prefix(out: pathlib.Path) -> str:
    """The name a new temporary sibling of `out` starts with: it says which process of which host makes it."""
    return f"{_sibling_prefix(out)}{socket.gethostname()}-{os.getpid()}-"


@contextlib.contextmanager
def temporary_file_beside(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a new empty file beside `out` (named as every temporary sibling), removed on exit unless it was
    renamed away; the stale siblings a killed writer of `out` left are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    fd, name = tempfile.mkstemp(prefix=_maker_prefix(out), dir=out.parent)
    os.close(fd)
    tmp = pathlib.Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def fresh_file(out: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a temporary sibling file of `out` to fill: it becomes `out` (mode 644) when the block completes.
    `out` must not exist, so nothing is ever overwritten."""
    out = pathlib.Path(out)
    if out.exists():
        raise FileExistsError(f"output {out} already exists; remove it or choose another")
    with temporary_file_beside(out) as tmp:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; outputs are meant to be shared
        if out.exists():
            raise FileExistsError(f"output {out} appeared while it was written (another run?)")
        os.rename(tmp, out)


@contextlib.contextmanager
def fresh_directory(out: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a new temporary sibling of `out` to fill: it becomes `out` when the block completes and is removed
    when it raises. `out` must not exist or be an empty directory, so nothing is ever overwritten. The stale
    siblings a killed writer of `out` left (see stale_siblings) are removed first."""
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_maker_prefix(out), dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
    try:
        yield tmp
        try:
            os.rename(tmp, out)  # onto an empty directory `out` too
        except OSError:
            raise FileExistsError(f"output {out} appeared while it was written (another run?)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
