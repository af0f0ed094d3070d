"""The launchers' shell quoting: a TPU worker command and an sbatch script run in a local bash (with stubs for
the programs they start) run no command smuggled into a value; #SBATCH values with a newline are refused."""

import os
import pathlib
import subprocess
import sys

import pytest

from mct.launch.jobs import slurm_script, tpu_commands

REPO = pathlib.Path(__file__).resolve().parents[1]
INJECTED = "x; touch pwned $(touch pwned) `touch pwned`"
TRAIN_ARGS = ["--config=x.py", "--config.workdir=$(touch pwned); touch pwned"]
# logs the working directory, the multislice coordinator's address and the arguments, a line each
STUB = '#!/bin/sh\n{ pwd; echo "$MEGASCALE_COORDINATOR_ADDRESS"; printf "%s\\n" "$@"; } > "$STUB_LOG"\n'


def run_in_bash(tmp_path: pathlib.Path, stubbed: str, *bash_args: str) -> list[str]:
    """`bash *bash_args` in tmp_path (also HOME) with `stubbed` a program that logs its call; the logged lines.
    Asserts that no `touch pwned` ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / stubbed).write_text(STUB)
    (bin_dir / stubbed).chmod(0o755)
    log = tmp_path / "stub.log"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "STUB_LOG": str(log),
    }
    subprocess.run(["bash", *bash_args], cwd=tmp_path, env=env, check=True, timeout=30)
    assert not list(tmp_path.rglob("pwned")), "an injected command ran"
    return log.read_text().splitlines()


def test_tpu_worker_command_runs_no_injected_command(tmp_path):
    (tmp_path / INJECTED).mkdir()
    (single,) = tpu_commands(["v5e"], "z", "", INJECTED, TRAIN_ARGS)
    remote = single[-1].removeprefix("--command=")
    cwd, _, *argv = run_in_bash(tmp_path, "python3", "-c", remote)
    assert cwd == str(tmp_path / INJECTED)
    assert argv == ["-m", "mct.train", "--distributed", *TRAIN_ARGS]
    multi = tpu_commands(["a", "b"], "z", "", "~/mct", TRAIN_ARGS, coordinator_host=INJECTED)
    (tmp_path / "mct").mkdir()
    cwd, coordinator, *_ = run_in_bash(tmp_path, "python3", "-c", multi[1][-1].removeprefix("--command="))
    assert (cwd, coordinator) == (str(tmp_path / "mct"), f"{INJECTED}:8080")  # ~ still expands


def test_sbatch_script_runs_no_injected_command(tmp_path):
    (tmp_path / INJECTED).mkdir()
    script = tmp_path / "job.sbatch"
    script.write_text(
        slurm_script(1, 8, TRAIN_ARGS, partition="gpu,debug", repo_dir=INJECTED, time_limit="1-2")
    )
    cwd, _, *argv = run_in_bash(tmp_path, "srun", str(script))
    assert cwd == str(tmp_path / INJECTED)
    assert argv == ["python3", "-m", "mct.train", "--distributed", *TRAIN_ARGS]


@pytest.mark.parametrize(
    "key, value",
    [("partition", "gpu\ntouch pwned"), ("time_limit", "1:00\ntouch pwned"), ("job_name", "a b")],
)
def test_sbatch_values_out_of_slurm_syntax_are_refused(key, value):
    with pytest.raises(ValueError, match="is not a valid value"):
        slurm_script(1, 8, TRAIN_ARGS, **{key: value})


def test_cli_refuses_a_partition_with_a_newline_in_one_line(tmp_path):
    """A subprocess, not launch.main: its flags (--out) would clash with another CLI's the tests define."""
    out = tmp_path / "job.sbatch"
    argv = ["slurm", "--nodes=1", "--gpus_per_node=8", "--partition=gpu\ntouch pwned", f"--out={out}"]
    command = [sys.executable, "-m", "mct.launch", *argv, "--", *TRAIN_ARGS]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert (
        run.stderr
        == "error: slurm --partition='gpu\\ntouch pwned' is not a valid value (e.g. gpu or gpu,debug)\n"
    )
    assert not out.exists()
