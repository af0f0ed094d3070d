"""Output directories written whole (prepared datasets, exports, imported and upcycled workdirs): filled in a
temporary sibling `.NAME.tmp-HOST-PID-XXXXXXXX` and renamed when complete, so an output is absent or complete.

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


@contextlib.contextmanager
def fresh_directory(out: str | pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a new temporary sibling of `out` to fill: it becomes `out` when the block completes and is removed
    when it raises. `out` must not exist or be an empty directory, so nothing is ever overwritten. The stale
    siblings a killed writer of `out` left (see stale_siblings) are removed first."""
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_siblings(out):
        log.info("removing %s, left by a killed writer of %s", stale, out)
        shutil.rmtree(stale, ignore_errors=True)
    maker = f"{socket.gethostname()}-{os.getpid()}-"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=_sibling_prefix(out) + maker, dir=out.parent))
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
