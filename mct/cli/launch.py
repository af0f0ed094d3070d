"""Starts `mct.train` as one process per host: locally (rehearsing a pod), on a TPU VM slice, or under SLURM.

python -m mct.launch local --processes 4 [--devices_per_process 2] -- --config ... --config.workdir ...
python -m mct.launch tpu --name NAME --zone ZONE [--project P] [--dry_run] -- <train flags>
python -m mct.launch slurm --nodes N --gpus_per_node G [--partition P] [--submit] -- <train flags>

commands:
  local  N processes on this machine (jax.distributed over loopback)
         --processes N [--devices_per_process D] [--heartbeat_timeout_s S] [--grace_s S]
  tpu    every worker of one or more TPU VM slices
         --name NAME (repeat for multislice) --zone ZONE [--project P] [--repo_dir DIR] [--coordinator_host H]
         [--dry_run]
  slurm  an sbatch script for a GPU cluster
         --nodes N --gpus_per_node G [--partition P] [--per_node] [--repo_dir DIR] [--time T] [--out FILE]
         [--submit]

Everything after `--` goes to `python -m mct.train` unchanged. A flag of another command is an error; bad
input prints one line `error: ...` and exits 2.

Flags and wiring only: `mct.launch.jobs` does the work.
"""

import functools
import shlex
import subprocess
import sys

from absl import app, flags

from mct.cli import common as cli
from mct.errors import UserError
from mct.launch.jobs import run_local, slurm_script, tpu_commands

PROG = "mct.launch"


F = flags.FLAGS


@functools.cache
def _define_flags() -> None:
    """This CLI's flags, on flags.FLAGS, once per process. Defined when the CLI runs, not on import, as the other
    entry points do: the tests import several of them into one process, and their flag names overlap (--out)."""
    app.define_help_flags()
    flags.DEFINE_integer("processes", None, "local: processes to start.", lower_bound=1)
    flags.DEFINE_integer("devices_per_process", 1, "local: CPU devices per process.", lower_bound=1)
    flags.DEFINE_integer("heartbeat_timeout_s", 10, "local: seconds before a silent peer ends the job.")
    flags.DEFINE_float("grace_s", 60.0, "local: seconds the others get to end after one process dies.")
    flags.DEFINE_multi_string("name", None, "tpu: slice name; repeat for multislice.")
    flags.DEFINE_string("zone", None, "tpu: the slices' zone.")
    flags.DEFINE_string("project", "", "tpu: Google Cloud project (default: gcloud's).")
    flags.DEFINE_string(
        "repo_dir",
        None,
        "tpu, slurm: where this repository is checked out (tpu: on the VMs, default ~/mct; "
        "slurm: default .).",
    )
    flags.DEFINE_string("coordinator_host", "", "tpu: multislice: hostname of slice 0's worker 0.")
    flags.DEFINE_bool("dry_run", False, "tpu: print the commands instead of running them.")
    flags.DEFINE_integer("nodes", None, "slurm: nodes.", lower_bound=1)
    flags.DEFINE_integer("gpus_per_node", None, "slurm: GPUs per node.", lower_bound=1)
    flags.DEFINE_string("partition", "", "slurm: partition.")
    flags.DEFINE_bool("per_node", False, "slurm: one process per node instead of per GPU.")
    flags.DEFINE_string("time", "", "slurm: time limit, e.g. 2:00:00.")
    flags.DEFINE_string("out", "mct.sbatch", "slurm: where to write the script.")
    flags.DEFINE_bool("submit", False, "slurm: submit it with sbatch.")


def _run_local(train_args: list[str]) -> int:
    return run_local(
        F.processes,
        F.devices_per_process,
        train_args,
        heartbeat_timeout_s=F.heartbeat_timeout_s,
        grace_s=F.grace_s,
    )


def _run_tpu(train_args: list[str]) -> int:
    repo_dir = "~/mct" if F.repo_dir is None else F.repo_dir
    try:
        commands = tpu_commands(F.name, F.zone, F.project, repo_dir, train_args, F.coordinator_host)
    except ValueError as e:
        raise UserError(str(e)) from None
    if F.dry_run:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    try:
        running = [subprocess.Popen(c) for c in commands]
    except OSError as e:  # no gcloud
        raise UserError(str(e)) from None
    return max(p.wait() for p in running)


def _run_slurm(train_args: list[str]) -> int:
    try:
        script = slurm_script(
            F.nodes,
            F.gpus_per_node,
            train_args,
            partition=F.partition,
            per_gpu=not F.per_node,
            repo_dir="." if F.repo_dir is None else F.repo_dir,
            time_limit=F.time,
        )
        with open(F.out, "w") as f:
            f.write(script)
        print(f"wrote {F.out}")
        if F.submit:
            return subprocess.run(["sbatch", F.out], check=False).returncode
    except (ValueError, OSError) as e:
        raise UserError(str(e)) from None  # --partition, --time not SLURM's; unwritable --out; no sbatch
    return 0


COMMANDS: dict[str, cli.Command] = {
    "local": cli.Command(
        _run_local,
        ("processes",),
        ("devices_per_process", "heartbeat_timeout_s", "grace_s"),
        "N processes on this machine (jax.distributed over loopback)",
    ),
    "tpu": cli.Command(
        _run_tpu,
        ("name", "zone"),
        ("project", "repo_dir", "coordinator_host", "dry_run"),
        "every worker of one or more TPU VM slices",
    ),
    "slurm": cli.Command(
        _run_slurm,
        ("nodes", "gpus_per_node"),
        ("partition", "per_node", "repo_dir", "time", "out", "submit"),
        "an sbatch script for a GPU cluster",
    ),
}


def _parse_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """argv ([program, ...]) split at its first `--`: absl parses the launcher's flags before it (from their
    defaults, so a process can run the CLI again) and leaves [program, command]; the training flags after it
    stay untouched. (absl itself would drop the `--` and append what follows to the positional arguments, so a
    stray word before it would pass for a training flag.) A malformed flag: one line `error: ...`, exit 2."""
    _define_flags()
    split = argv.index("--") if "--" in argv else len(argv)
    F.unparse_flags()
    return cli.parse_flags(argv[:split]), argv[split + 1 :]


def _run(parsed: tuple[list[str], list[str]]) -> int:
    """absl main: runs the command on the training flags; its exit code (local: 1 when a process died)."""
    positional, train_args = parsed
    try:
        command = cli.pick_command(PROG, COMMANDS, positional[1:])
        if not train_args:
            raise UserError(
                "give the training flags after `--`, e.g. -- --config experiments/configs/tiny_cpu.py"
            )
        return command.run(train_args)
    except cli.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    """`python -m mct.launch` with argv (default sys.argv[1:]); returns the exit code."""
    return _run(_parse_flags([PROG, *(sys.argv[1:] if argv is None else argv)]))


def entry() -> None:
    app.run(_run, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
