"""Pre-training entry point: python -m mct.train --config experiments/configs/tiny_cpu.py --config.workdir DIR

Flags, logging and signals only; `mct.pretrain.train` runs the workdir (resume, branches, eval, metrics, async
orbax checkpoints) over `mct.trainer`. SIGTERM saves a checkpoint and exits 0.
"""

import logging
import math
import signal
import threading

import jax
from absl import flags
from ml_collections import config_flags

from mct import cli
from mct.checkpoint import CheckpointMissing, CheckpointSaveError
from mct.distributed import initialize
from mct.pretrain import train
from mct.trainer import TrainingDiverged
from mct.workdir_lock import WorkdirLocked

cli.register_errors(TrainingDiverged, CheckpointSaveError, CheckpointMissing, WorkdirLocked)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (ml_collections).", lock_config=True)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join the jax.distributed job JAX detects (TPU, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "host:port of process 0, for an explicit multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in the explicit job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index in the explicit job.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices_per_process", 0, "Simulate this many CPU devices per process.")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100, "Seconds before a silent peer ends the job.")


def quiet_libraries() -> None:
    """orbax, grain and jax.distributed log every save / connection at INFO: keep warnings, and our own info
    lines (e.g. where the default corpus is prepared); orbax's own failure logs are replaced by mct's lines."""
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").addFilter(
        lambda r: r.levelno >= logging.WARNING or "data_pipelines" in r.pathname or "/mct/" in r.pathname
    )
    # orbax logs a failed save or restore with its traceback; mct reports each one itself, in one line
    logging.getLogger("absl").addFilter(lambda r: "/orbax/" not in r.pathname or r.levelno >= logging.CRITICAL)
    logging.getLogger("mct.train").setLevel(logging.INFO)


def main(argv: list[str]) -> None:
    del argv
    quiet_libraries()
    config = cli.config_from_flag(_CONFIG.value)
    initialize(
        coordinator=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
        cpu_devices_per_process=_CPU_DEVICES.value, heartbeat_timeout_s=_HEARTBEAT.value, auto=_DISTRIBUTED.value,
    )  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    result = train(config, stop=stop)
    if jax.process_index() == 0:
        finite = {k: v for k, v in result.items() if not (isinstance(v, float) and math.isnan(v))}
        print("done:", finite)


def entry() -> None:
    cli.run(main)


if __name__ == "__main__":
    entry()
