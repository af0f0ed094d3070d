"""The workdir lock: a second trainer is refused with the holder named; a released, killed or expired holder is
taken over; the lease alone works where flock is unsupported."""

import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from mct.errors import WorkdirLocked
from mct.run.lock import LOCK_FILE, WorkdirLock

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ["flock", "lease"]  # lease: flock raises ENOLCK, as on an object-store FUSE mount

# Holds the lock on argv[1] until a line arrives on stdin, then releases it.
HOLDER = """
import errno, fcntl, sys
from mct.run.lock import WorkdirLock
if sys.argv[2] == "lease":
    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    fcntl.flock = no_flock
lock = WorkdirLock(sys.argv[1], heartbeat_s=0.1).acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


def no_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")


@pytest.fixture
def start_holder():
    """Starts a process holding a workdir's lock (flock or lease mode); kills what is left at the end."""
    procs = []

    def start(workdir: pathlib.Path, mode: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(workdir), mode],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        assert proc.stdout.readline() == b"locked\n", proc.stderr.read().decode()
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def write_lease(workdir: pathlib.Path, **lease) -> None:
    (workdir / LOCK_FILE).write_text(json.dumps({"started": time.time() - 3600, "token": "theirs", **lease}))


def read_lease(workdir: pathlib.Path) -> dict:
    return json.loads((workdir / LOCK_FILE).read_text())


@pytest.mark.parametrize("mode", MODES)
def test_a_second_process_is_refused_naming_the_holder_until_it_releases(
    tmp_path, start_holder, monkeypatch, caplog, mode
):
    if mode == "lease":
        monkeypatch.setattr(fcntl, "flock", no_flock)
    holder = start_holder(tmp_path, mode)
    host = socket.gethostname()
    with pytest.raises(
        WorkdirLocked, match=rf"is in use by pid {holder.pid} on {host} since .* s ago\)"
    ) as e:
        WorkdirLock(tmp_path).acquire()
    assert "\n" not in str(e.value)

    holder.stdin.write(b"\n")
    holder.stdin.flush()
    assert holder.stdout.readline() == b"released\n"
    with caplog.at_level(logging.WARNING, logger="mct.run.lock"), WorkdirLock(tmp_path):
        assert read_lease(tmp_path)["pid"] == os.getpid()
    assert "stale" not in caplog.text  # a clean release leaves nothing to take over


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_holder_is_taken_over_at_once_with_a_warning(
    tmp_path, start_holder, monkeypatch, caplog, mode
):
    """flock: the kernel released the dead holder's lock; lease: its pid is dead on this host."""
    if mode == "lease":
        monkeypatch.setattr(fcntl, "flock", no_flock)
    holder = start_holder(tmp_path, mode)
    holder.kill()
    holder.wait()
    with caplog.at_level(logging.WARNING, logger="mct.run.lock"), WorkdirLock(tmp_path):
        assert read_lease(tmp_path)["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {holder.pid} on {socket.gethostname()}" in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_a_lease_from_another_host_is_refused_while_fresh_and_taken_over_once_expired(
    tmp_path, monkeypatch, caplog, mode
):
    """flock may succeed on a mount that locks per host only, so a fresh remote lease is refused either way."""
    if mode == "lease":
        monkeypatch.setattr(fcntl, "flock", no_flock)
    write_lease(tmp_path, pid=4242, host="other-host", heartbeat=time.time() - 50)
    with pytest.raises(
        WorkdirLocked, match=r"in use by pid 4242 on other-host since .* \(heartbeat 50 s ago\)"
    ):
        WorkdirLock(tmp_path, stale_after_s=60).acquire()

    write_lease(tmp_path, pid=4242, host="other-host", heartbeat=time.time() - 61)
    with caplog.at_level(logging.WARNING, logger="mct.run.lock"), WorkdirLock(tmp_path, stale_after_s=60):
        assert read_lease(tmp_path)["pid"] == os.getpid()
    assert "taking over the stale lock of pid 4242 on other-host" in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_the_heartbeat_refreshes_the_lease_and_release_frees_it(tmp_path, monkeypatch, mode):
    if mode == "lease":
        monkeypatch.setattr(fcntl, "flock", no_flock)
    with WorkdirLock(tmp_path, heartbeat_s=0.05):
        first = read_lease(tmp_path)["heartbeat"]
        deadline = time.time() + 10
        while read_lease(tmp_path)["heartbeat"] == first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.05)
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_a_holder_whose_lease_was_taken_over_stops_refreshing_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fcntl, "flock", no_flock)
    caplog.set_level(logging.ERROR, logger="mct.run.lock")
    lock = WorkdirLock(tmp_path, heartbeat_s=0.05).acquire()
    write_lease(tmp_path, pid=4242, host="other-host", heartbeat=time.time())
    deadline = time.time() + 10
    while "lost the workdir lock to pid 4242 on other-host" not in caplog.text:
        assert time.time() < deadline, "the takeover went unnoticed"
        time.sleep(0.05)
    lock.release()
    assert read_lease(tmp_path)["token"] == "theirs"  # neither refreshed nor cleared by the old holder


def test_a_disabled_lock_is_a_no_op(tmp_path, start_holder):
    start_holder(tmp_path, "flock")
    with WorkdirLock(tmp_path, enabled=False):  # another process of the job: process 0 holds the lock
        pass
    with WorkdirLock(tmp_path / "other", enabled=False):
        pass
    assert not (tmp_path / "other").exists()


def test_flock_refuses_a_holder_whose_lease_is_unreadable(tmp_path, start_holder):
    start_holder(tmp_path, "flock")
    (tmp_path / LOCK_FILE).write_text("")
    with pytest.raises(WorkdirLocked, match="in use by another process"):
        WorkdirLock(tmp_path).acquire()


@pytest.mark.parametrize("mode", MODES)
def test_a_fresh_lease_of_a_live_pid_on_this_host_is_stale_only_when_flock_proves_it(
    tmp_path, monkeypatch, mode
):
    """A crashed holder's pid may since belong to another process: holding the flock shows the holder gone."""
    write_lease(tmp_path, pid=os.getppid(), host=socket.gethostname(), heartbeat=time.time())
    if mode == "flock":
        with WorkdirLock(tmp_path):
            assert read_lease(tmp_path)["pid"] == os.getpid()
    else:
        monkeypatch.setattr(fcntl, "flock", no_flock)
        with pytest.raises(WorkdirLocked, match=f"in use by pid {os.getppid()} "):
            WorkdirLock(tmp_path).acquire()
