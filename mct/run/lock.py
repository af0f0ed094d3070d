"""An exclusive lock on a training workdir, so that two trainers never write the same run.

The holder flock()s WORKDIR/.mct-lock and keeps its lease in it (one JSON line: pid, host, start time and a
heartbeat a daemon thread refreshes every heartbeat_s). A fresh lease from another host is refused even when
flock succeeds (some network and FUSE mounts lock per host only). Where flock is unsupported (object-store
FUSE mounts) the lease alone decides, best effort: two processes starting in the same instant may both win.
A lease whose pid is dead on this host, or whose heartbeat is older than stale_after_s, is taken over.
"""

import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid

from data_pipelines.output_dirs import pid_alive
from mct.errors import WorkdirLocked

log = logging.getLogger(__name__)
LOCK_FILE = ".mct-lock"
# flock errors that mean "this filesystem cannot lock", as opposed to "someone else holds the lock"
FLOCK_UNSUPPORTED = (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def _describe(lease: dict) -> str:
    """'pid P on HOST since TIME (heartbeat N s ago)': who holds (or held) a lease."""
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(lease["started"]))
    age = time.time() - lease["heartbeat"]
    return f"pid {lease['pid']} on {lease['host']} since {since} (heartbeat {age:.0f} s ago)"


class WorkdirLock:
    """Holds WORKDIR/.mct-lock while entered (or between acquire and release). enabled=False, for every
    process of a job but process 0, makes it a no-op."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        heartbeat_s: float = 30.0,
        stale_after_s: float = 300.0,
    ):
        if stale_after_s <= heartbeat_s:
            raise ValueError(f"stale_after_s ({stale_after_s}) must exceed heartbeat_s ({heartbeat_s})")
        self.path = pathlib.Path(workdir).absolute() / LOCK_FILE
        self.enabled, self.heartbeat_s, self.stale_after_s = enabled, heartbeat_s, stale_after_s
        self.host = socket.gethostname()
        self._fd: int | None = None  # the flock()ed lock file while held; None on a filesystem without flock
        self._lease: dict | None = None  # ours, while held
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> "WorkdirLock":
        """Takes the lock, or raises WorkdirLocked naming the live holder. A stale holder is taken over with a
        warning naming it."""
        if not self.enabled or self._lease is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd = fd
        except BlockingIOError:  # a live process holds it
            os.close(fd)
            lease = self._read()
            raise WorkdirLocked(self._in_use_by(_describe(lease) if lease else "another process")) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in FLOCK_UNSUPPORTED:
                raise
            log.info("%s: flock unsupported (%s); relying on the heartbeat lease", self.path, e.strerror)
        old = self._read()
        if old is not None and not self._stale(old):
            self._unlock()
            raise WorkdirLocked(self._in_use_by(_describe(old)))
        if old is not None:
            log.warning("%s: taking over the stale lock of %s", self.path.parent, _describe(old))
        now = time.time()
        self._lease = {
            "pid": os.getpid(),
            "host": self.host,
            "started": now,
            "heartbeat": now,
            "token": uuid.uuid4().hex,
        }
        self._write(self._lease)
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stops the heartbeat, marks the lease free (unless another process took it over) and unlocks."""
        if self._lease is None:
            return
        self._stop.set()
        self._thread.join()
        if self._holds_lease():
            self._write(None)
        self._lease = None
        self._unlock()

    def _in_use_by(self, who: str) -> str:
        return f"{self.path.parent} is in use by {who}; stop that run or use another workdir ({self.path})"

    def _stale(self, lease: dict) -> bool:
        """The lease's holder has stopped: no heartbeat for stale_after_s, or, on this host, its pid is gone.
        Holding the flock proves a same-host holder gone (its pid may have been reused), as does its pid
        being ours (a restarted container numbers its processes alike)."""
        if time.time() - lease["heartbeat"] > self.stale_after_s:
            return True
        if lease["host"] != self.host:
            return False
        return self._fd is not None or lease["pid"] == os.getpid() or not pid_alive(lease["pid"])

    def _read(self) -> dict | None:
        """The lease in the lock file; None when free (missing, empty, or unreadable)."""
        try:
            return json.loads(self.path.read_text()) or None
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self, lease: dict | None) -> None:
        """Writes the lease (None: free). In place into the flock()ed file, since its inode is the lock;
        without flock by an atomic replace, so that a reader never sees half a lease."""
        data = (json.dumps(lease) + "\n").encode() if lease else b""
        if self._fd is not None:
            os.pwrite(self._fd, data, 0)
            os.ftruncate(self._fd, len(data))
        else:
            tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)

    def _holds_lease(self) -> bool:
        current = self._read()
        return current is not None and current.get("token") == self._lease["token"]

    def _heartbeat(self) -> None:
        """Refreshes the lease every heartbeat_s until released; stops if another process has taken it."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._holds_lease():
                    current = self._read()
                    who = _describe(current) if current else "nobody (the lock file was cleared)"
                    log.error(
                        "%s: lost the workdir lock to %s; another trainer may be writing this run",
                        self.path.parent,
                        who,
                    )
                    return
                self._lease["heartbeat"] = time.time()
                self._write(self._lease)
            except OSError as e:  # a flaky mount: try again next beat
                log.warning("%s: lock heartbeat failed: %s", self.path, e)

    def _unlock(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
