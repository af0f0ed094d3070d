"""Compile the train step ahead of time for a Cloud TPU slice, on any machine: does it fit, and what it costs.

python -m mct.aot --config experiments/configs/minicpm4_8b.py --topology v5p-128 [--num_slices N] [--json]
                  [--config.mesh.fsdp=... any other override]

`mct.trainer.build` runs on the abstract devices of the named slice (libtpu describes them; no TPU needed),
then the real TPU compiler compiles `Built.step_fn` for the abstract state and a batch of ShapeDtypeStructs.
Printed per device: the compiler's argument / output / temporary bytes against the chip's HBM, the compile
time, and XLA's FLOP count next to mct.flops'. Exit 0 when it fits; 3 and one line `does not fit: ...` when
it does not; 2 and one line `error: ...` for bad input or a compiler rejection (a kernel's name and shape).
"""

import json
import math
import os
import re
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from mct import cli, flops
from mct.config import Config, ConfigError
from mct.trainer import Built, build

GiB = 2**30
FIT_EXIT = 3


class Generation(NamedTuple):
    """One TPU generation: jax's topology prefix, HBM per chip, and its GCP sizes."""

    prefix: str  # jax topology names are "<prefix>:<topology>", e.g. "v5p:4x4x4"
    hbm_gib: int
    chip_config: str  # libtpu's: "megacore" = one device per two-TensorCore chip (v4, v5p)
    topologies: dict[int, str]  # the number in the GCP name -> chips along each torus axis


# v4 and v5p names count TensorCores (two per chip: v5p-128 is 64 chips), v5e and v6e names count chips.
_CUBES = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8", 512: "4x8x8",
          1024: "8x8x8", 2048: "8x8x16", 4096: "8x16x16"}  # fmt: skip
_PLANES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GENERATIONS = {
    "v4": Generation("v4", 32, "megacore", _CUBES),
    "v5p": Generation("v5p", 95, "megacore", _CUBES),
    "v5e": Generation("v5e", 16, "default", _PLANES),
    "v5litepod": Generation("v5e", 16, "default", _PLANES),  # v5e's other GCP name
    "v6e": Generation("v6e", 32, "default", _PLANES),
}


class Accelerator(NamedTuple):
    """A Cloud TPU accelerator type (one slice), e.g. v5p-128: 64 chips in a 4x4x4 torus."""

    name: str
    generation: Generation
    topology: str

    @property
    def chips(self) -> int:
        return math.prod(int(n) for n in self.topology.split("x"))

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host: 4 in a 2x2 block, except the one-host v5e/v6e-8 (2x4) and -1 (1x1)."""
        return {"1x1": (1, 1, 1), "2x4": (2, 4, 1)}.get(self.topology, (2, 2, 1))

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_gib * GiB


def known_accelerators() -> list[str]:
    return [f"{name}-{n}" for name, g in GENERATIONS.items() for n in g.topologies]


def accelerator(name: str) -> Accelerator:
    """The accelerator type of a GCP name (v4-*, v5p-*, v5e-* / v5litepod-*, v6e-*); UserError lists the known."""
    generation, _, size = name.partition("-")
    g = GENERATIONS.get(generation)
    if g is None or not size.isdigit() or int(size) not in g.topologies:
        raise cli.UserError(f"unknown --topology {name!r}; known: {', '.join(known_accelerators())}")
    return Accelerator(name, g, g.topologies[int(size)])


def topology_devices(acc: Accelerator, num_slices: int = 1) -> list:
    """The abstract devices of `num_slices` slices of `acc` (libtpu's topology description; no TPU needed)."""
    from jax.experimental import topologies

    # Read by libtpu when it first loads: with them a machine without TPUs skips the metadata queries and
    # the one-process lock (/tmp/libtpu_lockfile) and logs nothing.
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
                       ("TPU_ACCELERATOR_TYPE", acc.name), ("TPU_WORKER_HOSTNAMES", "localhost")):  # fmt: skip
        os.environ.setdefault(key, value)
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{acc.generation.prefix}:{acc.topology}",
            chip_config_name=acc.generation.chip_config, chips_per_host_bounds=acc.host_bounds,
            num_slices=num_slices,
        )  # fmt: skip
    except Exception as e:  # libtpu missing or unloadable: jax raises RuntimeError / JaxRuntimeError
        raise cli.UserError(f"cannot describe {acc.name} through libtpu: {first_line(str(e))}") from None
    return list(topology.devices)


def for_tpu(config: Config) -> Config:
    """The config as a TPU run resolves it: compute_dtype "auto" is bfloat16 there (this process is on CPU)."""
    if config.model.compute_dtype != "auto":
        return config
    return config.replace(model=config.model.__class__(**{**vars(config.model), "compute_dtype": "bfloat16"}))


def build_for(config: Config, acc: Accelerator, num_slices: int) -> Built:
    """`build` on the slices' devices; a mesh that does not tile them names both."""
    devices = topology_devices(acc, num_slices)
    try:
        config.mesh.shape(len(devices))
    except ConfigError as e:
        raise ConfigError(f"{e} of {describe(acc, num_slices)}") from None
    return build(for_tpu(config), devices)


def describe(acc: Accelerator, num_slices: int) -> str:
    slices = f"{num_slices} x " if num_slices > 1 else ""
    return f"{slices}{acc.name} ({acc.chips} chips, {acc.topology}, {acc.generation.hbm_gib} GiB HBM each)"


def abstract_batch(built: Built) -> dict:
    """ShapeDtypeStructs of one global batch as data_pipelines.loader makes it: [train.batch_size, seq_len]."""
    shape = (built.config.train.batch_size, built.config.data.seq_len)
    leaf = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=built.batch_sharding)
    keys = ("tokens", "targets", "segment_ids", "positions")
    return {**{k: leaf(jnp.int32) for k in keys}, "loss_mask": leaf(jnp.float32)}


class CompileError(Exception):
    """The TPU compiler (or Pallas' Mosaic lowering) rejected the step; the message is one line."""


class OutOfMemory(Exception):
    """The TPU compiler's own out-of-memory verdict: (used, capacity) bytes per device."""

    def __init__(self, used: float, capacity: float):
        super().__init__(f"{used} of {capacity}")
        self.used, self.capacity = used, capacity


def compile_step(built: Built):
    """(compiled step, seconds): lowers `built.step_fn` for its abstract state and batch, compiles it."""
    step = jax.ShapeDtypeStruct((), jnp.int32)
    try:
        with jax.set_mesh(built.mesh):
            lowered = built.step_fn.lower(built.abstract_state, abstract_batch(built), step)
        start = time.perf_counter()
        compiled = lowered.compile()
    except Exception as e:  # the compiler's errors are JaxRuntimeError, Pallas' lowering errors ValueError...
        print(str(e)[:6000]); raise
    return compiled, time.perf_counter() - start


_HBM_OOM = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")


def compile_failure(e: Exception) -> Exception:
    """OutOfMemory for the compiler's HBM verdict, else a one-line CompileError naming the kernel if one failed."""
    text = str(e)
    oom = _HBM_OOM.search(text)
    if oom:
        unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        used, capacity = (float(oom[i]) * unit[oom[i + 1]] for i in (1, 3))
        return OutOfMemory(used, capacity)
    kernel = re.search(r"(?:kernel|pallas_call)\W+name\W+(\w+)", text)
    where = f" (kernel {kernel[1]})" if kernel else ""
    return CompileError(f"the TPU compiler rejected the train step{where}: {first_line(text)}")


def first_line(text: str) -> str:
    """The first line that says something (a compiler dump starts with blank and bookkeeping lines)."""
    lines = [line.strip() for line in text.splitlines()]
    return next((line for line in lines if line and not line.startswith(("Traceback", "---", "==="))), text)
