"""Pre-training entry point: python -m mct.train --config experiments/configs/tiny_cpu.py --config.workdir DIR

Flags, logging and signals only; `mct.run.training_run.train` runs the workdir (resume, branches, eval, metrics, async
orbax checkpoints) over `mct.train.trainer`. SIGTERM saves a checkpoint and exits 0.
"""

import logging
import math
import signal
import threading
from collections.abc import Callable

import jax
from absl import flags
from ml_collections import config_flags

from mct.cli import common as cli
from mct.config.run import Config
from mct.parallel.distributed import initialize
from mct.run.training_run import train


def _define_flags() -> None:
    """The training CLIs' flags, defined when one runs (not on import: mct.rl and others define --config too)."""
    config_flags.DEFINE_config_file(
        "config", None, "Training config file (ml_collections).", lock_config=True
    )
    flags.DEFINE_bool("distributed", False, "Join the jax.distributed job JAX detects (TPU, SLURM).")
    flags.DEFINE_string("coordinator", "", "host:port of process 0, for an explicit multi-process job.")
    flags.DEFINE_integer("num_processes", 1, "Processes in the explicit job.")
    flags.DEFINE_integer("process_id", 0, "This process's index in the explicit job.")
    flags.DEFINE_integer("cpu_devices_per_process", 0, "Simulate this many CPU devices per process.")
    flags.DEFINE_integer("heartbeat_timeout_s", 100, "Seconds before a silent peer ends the job.")


def quiet_libraries() -> None:
    """orbax, grain and jax.distributed log every save / connection at INFO: keep warnings, and our own info
    lines (e.g. where the default corpus is prepared); orbax's own failure logs are replaced by mct's lines."""
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(
        lambda r: r.levelno >= logging.WARNING or "data_pipelines" in r.pathname or "/mct/" in r.pathname
    )
    # orbax logs a failed save or restore with its traceback; mct reports each one itself, in one line
    logging.getLogger("absl").addFilter(
        lambda r: "/orbax/" not in r.pathname or r.levelno >= logging.CRITICAL
    )
    logging.getLogger("mct.train").setLevel(logging.INFO)


def run_job(train_fn: Callable[..., dict], config_class: type[Config] = Config) -> None:
    """Every training entry point's body (pre-training, mct.sft, mct.dpo, mct.rl): the config (a
    `config_class`), the distributed job, SIGTERM -> stop (the run saves and returns), `train_fn(config,
    stop=...)` and its result line."""
    quiet_libraries()
    f = flags.FLAGS
    config = cli.config_from_flag(f.config, config_class)
    initialize(
        coordinator=f.coordinator,
        num_processes=f.num_processes,
        process_id=f.process_id,
        cpu_devices_per_process=f.cpu_devices_per_process,
        heartbeat_timeout_s=f.heartbeat_timeout_s,
        auto=f.distributed,
    )
    stop = threading.Event()
    if jax.process_count() == 1:  # several processes hear SIGTERM through JAX's preemption service instead
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    result = train_fn(config, stop=stop)
    if jax.process_index() == 0:
        finite = {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))}
        print("done:", finite)


def entry_for(train_fn: Callable[..., dict], config_class: type[Config] = Config) -> Callable[[], None]:
    """The console entry point of a training function (mct-train, mct-sft, mct-dpo, mct-rl) whose config is a
    `config_class`."""

    def entry() -> None:
        _define_flags()
        cli.run(lambda argv: run_job(train_fn, config_class), config_class)

    return entry


entry = entry_for(train)


if __name__ == "__main__":
    entry()
