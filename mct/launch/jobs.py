"""`mct.train` as one process per host: local processes (rehearsing a pod, jax.distributed over loopback), the
workers of TPU VM slices (gcloud ssh commands), or an sbatch script for a SLURM GPU cluster.

Every value that goes into a shell command or a script is quoted (`shell_word`), and the values of #SBATCH
lines, which no quoting protects from a newline, must match their SLURM syntax: a value never runs as code.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import portpicker


def _describe_exit(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


# The syntax (a pattern, an example) of each sbatch option whose value slurm_script writes from a caller's text.
_SBATCH_SYNTAX = {
    "job-name": (re.compile(r"[A-Za-z0-9_.-]+"), "mct"),
    "partition": (re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"), "gpu or gpu,debug"),
    "time": (re.compile(r"\d+(-\d+)?(:\d+){0,2}|UNLIMITED|INFINITE"), "90, 2:00:00 or 1-12:00:00"),
}


def shell_word(value: str) -> str:
    """`value` as one shell word, metacharacters inert; a leading `~` or `~/` still expands to the home directory
    (the default repo_dir is ~/mct on the TPU VMs)."""
    if value == "~" or value.startswith("~/"):
        rest = value[2:]
        return "~/" + shlex.quote(rest) if rest else "~"
    return shlex.quote(value)


def sbatch_line(option: str, value: str) -> str:
    """`#SBATCH --option=value`; ValueError unless value has the option's syntax: the line is a comment to the
    shell, but a newline in the value would start a line the script runs, and no quoting stops that."""
    pattern, example = _SBATCH_SYNTAX[option]
    if not pattern.fullmatch(value):
        raise ValueError(f"slurm --{option}={value!r} is not a valid value (e.g. {example})")
    return f"#SBATCH --{option}={value}"


def train_command(python: str, train_args: list[str], *extra: str) -> list[str]:
    return [python, "-m", "mct.train", *extra, *train_args]


def run_local(
    processes: int,
    devices_per_process: int,
    train_args: list[str],
    *,
    heartbeat_timeout_s: int = 10,
    grace_s: float = 60.0,
) -> int:
    """Runs the job as `processes` local processes over loopback (gloo). If one dies, reports which and ends the
    rest within `grace_s`; SIGTERM/SIGINT to the launcher reach every process (preemption: each saves, exits 0)."""
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # devices: --cpu_devices_per_process
    job = [
        f"--coordinator={address}",
        f"--num_processes={processes}",
        f"--heartbeat_timeout_s={heartbeat_timeout_s}",
        f"--cpu_devices_per_process={devices_per_process}",
    ]
    children = [
        subprocess.Popen(train_command(sys.executable, train_args, *job, f"--process_id={i}"), env=env)
        for i in range(processes)
    ]

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [c.poll() for c in children]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                break
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.1)
        first, code = failed[0]
        print(f"launch: process {first} (pid {children[first].pid}) {_describe_exit(code)}", file=sys.stderr)
        deadline = time.time() + grace_s
        while any(c.poll() is None for c in children) and time.time() < deadline:
            time.sleep(0.1)
        for i, child in enumerate(children):
            if child.poll() is None:
                print(f"launch: process {i} still running after {grace_s:.0f} s; killing it", file=sys.stderr)
                child.kill()
                child.wait()
            elif i != first:
                print(f"launch: process {i} {_describe_exit(child.returncode)}", file=sys.stderr)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def tpu_commands(
    names: list[str],
    zone: str,
    project: str,
    repo_dir: str,
    train_args: list[str],
    coordinator_host: str = "",
) -> list[list[str]]:
    """One `gcloud ... tpu-vm ssh --worker=all` per slice; every worker runs the same train command and
    JAX finds its peers itself. Several slices form a multislice job (DCN between slices)."""
    if len(names) > 1 and not coordinator_host:
        raise ValueError(
            "a multislice job (several --name) needs --coordinator_host (worker 0 of the first slice)"
        )
    commands = []
    for slice_id, name in enumerate(names):
        env = ""
        if len(names) > 1:
            env = (
                f"MEGASCALE_COORDINATOR_ADDRESS={shell_word(f'{coordinator_host}:8080')} "
                f"MEGASCALE_NUM_SLICES={len(names)} MEGASCALE_SLICE_ID={slice_id} "
            )
        train = shlex.join(train_command("python3", train_args, "--distributed"))
        remote = f"cd {shell_word(repo_dir)} && {env}{train}"
        command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}", "--worker=all"]
        if project:
            command.append(f"--project={project}")
        commands.append([*command, f"--command={remote}"])
    return commands


def slurm_script(
    nodes: int,
    gpus_per_node: int,
    train_args: list[str],
    *,
    partition: str = "",
    per_gpu: bool = True,
    repo_dir: str = ".",
    job_name: str = "mct",
    time_limit: str = "",
) -> str:
    """An sbatch script: srun starts one process per GPU (or per node) and JAX reads the SLURM environment.
    ValueError for a partition, time limit or job name that is not SLURM's syntax (sbatch_line)."""
    if not (nodes > 0 and gpus_per_node > 0):
        raise ValueError(f"slurm nodes={nodes} and gpus_per_node={gpus_per_node} must be positive")
    tasks = gpus_per_node if per_gpu else 1
    lines = [
        "#!/bin/bash",
        sbatch_line("job-name", job_name),
        f"#SBATCH --nodes={nodes}",
        f"#SBATCH --ntasks-per-node={tasks}",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        "#SBATCH --output=%x-%j.out",
    ]
    if per_gpu:
        lines.append("#SBATCH --gpus-per-task=1")
    if partition:
        lines.append(sbatch_line("partition", partition))
    if time_limit:
        lines.append(sbatch_line("time", time_limit))
    lines += [
        "set -euo pipefail",
        f"cd {shell_word(repo_dir)}",
        f"srun {shlex.join(train_command('python3', train_args, '--distributed'))}",
    ]
    return "\n".join(lines) + "\n"
