"""A failed checkpoint save (a full disk) stops the run: one-line CheckpointSaveError naming the step, the cause
and the last good checkpoint, raised by the first check after the failure; its tmp directory is removed and the
previous checkpoint stays restorable. A checkpoints directory turned read-only ends the process at once."""

import errno
import os
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mct.errors import CheckpointSaveError
from mct.parallel.sharding import abstract_with_shardings
from mct.run.checkpoint import Checkpointer, _orbax_write_threads, root_cause
from tests.data_fixtures import make_tiny_dataset
from tests.tiny_runs import REPO, VOCAB, train_flags

STATE = {"w": jnp.arange(8.0), "b": jnp.ones((2, 3))}


def full_disk(monkeypatch, gate: threading.Event | None = None) -> None:
    """The JSON items' write (data, meta) fails with ENOSPC; with a gate, only once it is set (async saves write
    in a background thread, so the test can look while the save is still running)."""

    async def write_fails(self, x, directory):
        if gate is not None:
            gate.wait(timeout=60)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", write_fails)


def assert_failed_at_40_with_20_intact(error: CheckpointSaveError, ckpt: Checkpointer) -> None:
    assert str(error) == (
        f"checkpoint save at step 40 failed: No space left on device in {ckpt.directory}; "
        "last good checkpoint: step 20"
    )
    assert sorted(p.name for p in ckpt.directory.iterdir()) == ["20"]  # no 40.orbax-checkpoint-tmp left
    reader = Checkpointer(str(ckpt.directory.parent), read_only=True)
    assert reader.all_steps() == [20]
    abstract = abstract_with_shardings(STATE, {k: v.sharding for k, v in STATE.items()})
    state, data, meta = reader.restore(20, abstract)
    for k in STATE:
        np.testing.assert_array_equal(state[k], STATE[k])
    assert (data, meta) == ({"pos": 20}, {"step": 20})


def test_a_failed_synchronous_save_raises_at_once(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path), async_save=False, max_to_keep=1)
    ckpt.save(20, STATE, {"pos": 20}, {"step": 20})
    full_disk(monkeypatch)
    with pytest.raises(CheckpointSaveError) as e:
        ckpt.save(40, STATE, {"pos": 40}, {"step": 40})
    assert_failed_at_40_with_20_intact(e.value, ckpt)
    ckpt.close()


def test_a_failed_async_save_is_raised_by_the_first_check_after_it_failed(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path), max_to_keep=1)  # step 20 is due for deletion once 40 commits
    ckpt.save(20, STATE, {"pos": 20}, {"step": 20})
    ckpt.wait()
    gate = threading.Event()
    full_disk(monkeypatch, gate)
    ckpt.save(40, STATE, {"pos": 40}, {"step": 40})
    ckpt.check_saves()  # still writing: returns at once
    assert list(ckpt.directory.glob("40.orbax-checkpoint-tmp*"))
    gate.set()
    deadline = time.time() + 60
    while ckpt.manager.is_saving_in_progress():
        assert time.time() < deadline, "the save never finished"
        time.sleep(0.01)
    with pytest.raises(CheckpointSaveError) as e:
        ckpt.check_saves()
    assert_failed_at_40_with_20_intact(e.value, ckpt)
    ckpt.check_saves()  # reported once: the train loop's cleanup (wait, close) does not raise it again
    ckpt.wait()
    ckpt.close()


@pytest.mark.parametrize("found_by", ["next save", "wait", "close"])
def test_an_unchecked_async_failure_is_raised_by_the_next_save_wait_or_close(tmp_path, monkeypatch, found_by):
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(20, STATE, {"pos": 20}, {"step": 20})
    full_disk(monkeypatch)
    ckpt.save(40, STATE, {"pos": 40}, {"step": 40})
    with pytest.raises(CheckpointSaveError) as e:
        if found_by == "next save":
            ckpt.save(60, STATE, {"pos": 60}, {"step": 60})  # names step 40, and does not save 60
        elif found_by == "wait":
            ckpt.wait()
        else:
            ckpt.close()
    assert_failed_at_40_with_20_intact(e.value, ckpt)
    ckpt.close()


def test_a_failed_save_finds_the_writes_it_waits_for(tmp_path, monkeypatch):
    """The other writes of a failed save are found by orbax's private thread class (the one orbax private mct
    names): an orbax that renames it fails here, not as a tmp directory left behind on a full disk."""
    ckpt = Checkpointer(str(tmp_path))
    gate = threading.Event()
    full_disk(monkeypatch, gate)
    ckpt.save(20, STATE, {"pos": 20}, {"step": 20})
    assert _orbax_write_threads()  # the JSON items' writes wait at the gate
    gate.set()
    with pytest.raises(CheckpointSaveError):
        ckpt.wait()
    assert not _orbax_write_threads() and not list(ckpt.directory.iterdir())
    ckpt.close()


def test_checkpoints_turned_read_only_mid_run_end_the_process_at_once_on_its_own_error_line(tmp_path):
    """The last save of a run fails because its checkpoints directory turned read-only after the first save
    (tests/read_only_checkpoints.py): exit 2 within seconds, not minutes on orbax's threads, and the `error:`
    line starts a line of its own after the progress bar."""
    dataset = make_tiny_dataset(tmp_path / "data", vocab_size=VOCAB, num_docs=60)
    workdir = tmp_path / "run"
    steps = {
        "train.steps": 2,
        "schedule.warmup_steps": 0,
        "schedule.decay_steps": 1,
        "checkpoint.every_steps": 1,
    }
    fault = [sys.executable, "-m", "tests.read_only_checkpoints", str(workdir / "checkpoints")]
    env = {**os.environ, "XLA_FLAGS": ""}
    began = time.monotonic()
    done = subprocess.run(
        [*fault, *train_flags(workdir, dataset, **steps)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - began
    assert done.returncode == 2, done.stderr[-3000:]
    assert [line for line in done.stderr.split("\n") if "error:" in line] == [
        f"error: checkpoint save at step 2 failed: Read-only file system in {workdir / 'checkpoints'}; "
        "last good checkpoint: step 1"
    ]
    assert took < 60, f"the process took {took:.0f} s to end"


def test_root_cause_is_one_line_naming_the_os_error():
    tensorstore = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/ck/40.orbax-checkpoint-tmp/'
        "state\": Failed to write 601294 bytes to file 11: No space left on device [os_error_code='28']"
    )
    assert root_cause(tensorstore) == "No space left on device"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise TimeoutError("the commit thread failed") from e
    except TimeoutError as wrapped:
        assert root_cause(wrapped) == "No space left on device"
    assert root_cause(RuntimeError("first line\nsecond line")) == "first line"
    assert root_cause(KeyError()) == "KeyError"
