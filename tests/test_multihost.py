"""Multi-process training on local processes (jax.distributed over loopback, gloo): same losses as one
process, resharding restore across process counts, a killed process, preemption, the launchers' commands."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mct.launch.jobs import slurm_script, tpu_commands
from mct.run.checkpoint import Checkpointer
from tests.data_fixtures import make_tiny_dataset
from tests.tiny_runs import REPO, VOCAB, losses, train_flags

# 4 devices in every run (mesh data=4), global batch 8: only the number of processes changes.
STEPS = 24
RUN = {"mesh.data": -1, "train.steps": STEPS, "checkpoint.every_steps": 4, "eval.every_steps": 20}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=VOCAB, num_docs=200)


def launch(processes: int, workdir, dataset, *, wait: bool = True, **extra):
    command = [
        sys.executable,
        "-m",
        "mct.launch",
        "local",
        f"--processes={processes}",
        f"--devices_per_process={4 // processes}",
        "--grace_s=30",
        "--heartbeat_timeout_s=5",
        "--",
        *train_flags(workdir, dataset, **{**RUN, **extra}),
    ]
    # no XLA_FLAGS (each process has its own devices) and no persistent compilation cache: with jax 0.12.1, two
    # CPU processes that both load their step from a warm cache hang before their first checkpoint
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if not wait:
        return proc
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err.decode()[-4000:]
    return proc


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, dataset) -> dict[int, float]:
    workdir = tmp_path_factory.mktemp("p1")
    launch(1, workdir, dataset)
    return losses(workdir)


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory, dataset) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("p4")
    launch(4, workdir, dataset)
    return workdir


def assert_same_losses(got: dict[int, float], want: dict[int, float], steps) -> None:
    """Same global batches and mesh: equal up to float reassociation in the cross-process all-reduces, which
    training amplifies step by step (measured up to 1.3e-4 relative by step 34; other data differs by ~1e-1)."""
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-3), step


def test_four_processes_match_one(four_processes, one_process):
    assert_same_losses(losses(four_processes), one_process, range(1, STEPS + 1))


def test_checkpoint_from_four_processes_resumes_on_two_and_one(
    tmp_path, dataset, four_processes, one_process
):
    half = STEPS // 2
    for processes in (2, 1):
        workdir = tmp_path / f"resume{processes}"
        shutil.copytree(four_processes / "checkpoints" / str(half), workdir / "checkpoints" / str(half))
        launch(processes, workdir, dataset)
        got = losses(workdir)
        assert sorted(got) == list(range(half + 1, STEPS + 1))
        assert_same_losses(got, one_process, got)  # the data continues exactly where the 4 processes left it


def _processes():
    """(pid, command line) of every process, from /proc."""
    for entry in pathlib.Path("/proc").iterdir():
        try:
            yield int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (ValueError, OSError):
            continue


def _wait_for(predicate, proc, timeout=400):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-4000:])
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_two_processes_killed_one_restarted_match_one(tmp_path, dataset, one_process):
    """SIGKILL process 1 mid-run: the launcher names it and the job ends in bounded time; the same command
    resumes from the last committed checkpoint; every step's loss equals the 1-process run's."""
    proc = launch(2, tmp_path, dataset, wait=False, **{"checkpoint.async_save": False})
    ckpts = tmp_path / "checkpoints"
    _wait_for(
        lambda: ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 8 for p in ckpts.iterdir()), proc
    )
    victim = next(pid for pid, args in _processes() if "--process_id=1" in args and str(tmp_path) in args)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert time.time() - killed_at < 60  # heartbeat timeout + grace: no hang
    assert "process 1" in err.decode() and "SIGKILL" in err.decode()
    assert max(Checkpointer(tmp_path, read_only=True).all_steps()) < STEPS
    launch(2, tmp_path, dataset, **{"checkpoint.async_save": False})
    assert_same_losses(losses(tmp_path), one_process, range(1, STEPS + 1))


def test_sigterm_to_one_process_stops_every_process_at_one_step_and_saves(tmp_path, dataset):
    """A preemption notice reaching one host (or reaching hosts at different steps) stops all at the step JAX's
    preemption service agrees on; per-process stop flags would leave the others waiting in a collective."""
    proc = launch(
        2, tmp_path, dataset, wait=False, **{"train.steps": 100000, "checkpoint.every_steps": 100000}
    )
    _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(losses(tmp_path)) >= 3, proc)
    victim = next(pid for pid, args in _processes() if "--process_id=1" in args and str(tmp_path) in args)
    os.kill(victim, signal.SIGTERM)  # process 1 only, not the launcher
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-4000:]
    saved = Checkpointer(tmp_path, read_only=True).all_steps()
    assert len(saved) == 1 and saved[0] >= 3


def test_tpu_and_slurm_commands():
    flags = ["--config", "experiments/configs/minicpm4_8b.py", "--config.workdir=gs://bucket/run"]
    (single,) = tpu_commands(["pod-a"], "us-central2-b", "proj", "~/mct", flags)
    assert single[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert "--zone=us-central2-b" in single and "--worker=all" in single and "--project=proj" in single
    assert single[-1] == (
        "--command=cd ~/mct && python3 -m mct.train --distributed --config experiments/configs/minicpm4_8b.py "
        "--config.workdir=gs://bucket/run"
    )
    multi = tpu_commands(["a", "b"], "z", "", "~/mct", flags, coordinator_host="a-w-0")
    assert "MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID=1" in multi[1][-1]
    assert "MEGASCALE_COORDINATOR_ADDRESS=a-w-0:8080" in multi[0][-1]
    with pytest.raises(ValueError, match="coordinator_host"):
        tpu_commands(["a", "b"], "z", "", "~/mct", flags)
    script = slurm_script(4, 8, flags, partition="gpu", time_limit="2:00:00")
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=2:00:00",
    ):
        assert line in script.splitlines()
    assert script.splitlines()[-1] == (
        "srun python3 -m mct.train --distributed --config experiments/configs/minicpm4_8b.py "
        "--config.workdir=gs://bucket/run"
    )
    assert "#SBATCH --ntasks-per-node=1" in slurm_script(2, 8, flags, per_gpu=False)


def test_launcher_cli_dry_run():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mct.launch",
            "tpu",
            "--name=v5e",
            "--zone=z",
            "--dry_run",
            "--",
            "--config=x.py",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("gcloud compute tpus tpu-vm ssh v5e --zone=z --worker=all")


def test_a_job_on_a_locked_workdir_ends_at_once_on_every_process(tmp_path, dataset):
    """Process 0 holds the workdir lock for its job: a second job's process 0 is refused, and its other processes
    learn it and stop too (no wait at a collective until the heartbeat timeout)."""
    from mct.run.lock import WorkdirLock

    with WorkdirLock(tmp_path):
        started = time.time()
        proc = launch(2, tmp_path, dataset, wait=False)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - started < 60
    assert "is in use by pid" in err.decode()
    assert not (tmp_path / "checkpoints").exists()
