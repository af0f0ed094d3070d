"""Multi-process helpers: joining a jax.distributed job, batches from per-process data, gathering host objects.

One process per host (TPU VM worker, SLURM task, or a local process rehearsing a pod on this machine).
"""

import json
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def initialize(
    *,
    coordinator: str = "",
    num_processes: int = 1,
    process_id: int = 0,
    cpu_devices_per_process: int = 0,
    heartbeat_timeout_s: int = 100,
    auto: bool = False,
) -> None:
    """Joins the job before any other JAX call. `auto` lets JAX detect the cluster (TPU pods, SLURM);
    otherwise an explicit coordinator address with num_processes > 1. cpu_devices_per_process > 0 simulates
    hosts on CPU (gloo collectives). A peer that stops heartbeating ends every process after the timeout."""
    if cpu_devices_per_process:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices_per_process)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    elif num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=120,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
        )


def stop_agreed(stop: threading.Event, step: int) -> bool:
    """Whether to stop before `step`. One process: its `stop` event (set on SIGTERM). Several: JAX's preemption
    sync point, the step every process reaches after any of them got SIGTERM, so that all stop and save at the
    same step (per-process events stop at different steps and leave the others waiting in a collective).
    Call it at every step from the same start on every process; it sets `stop` when the job stops."""
    if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
        stop.set()
    return stop.is_set()


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Each process holds its rows [per_process_batch, seq]; the result is the [global_batch, seq] array."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def gather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a no-op list with one process)."""
    if jax.process_count() == 1:
        return [obj]
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]
