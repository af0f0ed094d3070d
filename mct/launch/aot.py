"""The train step compiled ahead of time for a Cloud TPU slice on any machine: does it fit, and what it costs.

`mct.train.trainer.build` runs on the abstract devices of the named slice (libtpu describes them; no TPU
needed), then the real TPU compiler compiles `TrainSetup.step_fn` for the abstract state and a batch of
ShapeDtypeStructs. The report: the compiler's argument / output / temporary bytes per device against the
chip's HBM, the compile time, and XLA's FLOP count next to mct.model.flops'.
"""

import dataclasses
import math
import os
import re
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from data_pipelines.extras import import_extra
from mct.config.run import Config
from mct.errors import CompileError, ConfigError, UserError
from mct.model import flops
from mct.train.trainer import TrainSetup, build

GiB = 2**30


FIT_EXIT = 3


class Generation(NamedTuple):
    """One TPU generation: jax's topology prefix, HBM and bf16 matmul peak per chip, and its GCP sizes."""

    prefix: str  # jax topology names are "<prefix>:<topology>", e.g. "v5p:4x4x4"
    hbm_gib: int
    bf16_flops: float  # peak FLOP/s per chip (= per device: megacore chips are one device), Cloud TPU's specs
    chip_config: str  # libtpu's: "megacore" = one device per two-TensorCore chip (v4, v5p)
    topologies: dict[int, str]  # the number in the GCP name -> chips along each torus axis


_CUBES = {
    8: "2x2x1",
    16: "2x2x2",
    32: "2x2x4",
    64: "2x4x4",
    128: "4x4x4",
    256: "4x4x8",
    512: "4x8x8",
    1024: "8x8x8",
    2048: "8x8x16",
    4096: "8x16x16",
}


_PLANES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


GENERATIONS = {
    "v4": Generation("v4", 32, 275e12, "megacore", _CUBES),
    "v5p": Generation("v5p", 95, 459e12, "megacore", _CUBES),
    "v5e": Generation("v5e", 16, 197e12, "default", _PLANES),
    "v5litepod": Generation("v5e", 16, 197e12, "default", _PLANES),  # v5e's other GCP name
    "v6e": Generation("v6e", 32, 918e12, "default", _PLANES),
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
        raise UserError(f"unknown --topology {name!r}; known: {', '.join(known_accelerators())}")
    return Accelerator(name, g, g.topologies[int(size)])


def topology_devices(acc: Accelerator, num_slices: int = 1) -> list:
    """The abstract devices of `num_slices` slices of `acc` (libtpu's topology description; no TPU needed)."""
    # Read by libtpu when it first loads: with them a machine without TPUs skips the metadata queries and
    # the one-process lock (/tmp/libtpu_lockfile) and logs nothing.
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
        ("TPU_ACCELERATOR_TYPE", acc.name),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
    ):
        os.environ.setdefault(key, value)
    import_extra("libtpu", "tpu")  # the TPU compiler describes the slice and compiles for it
    try:
        topology = topologies.get_topology_desc(
            platform="tpu",
            topology_name=f"{acc.generation.prefix}:{acc.topology}",
            chip_config_name=acc.generation.chip_config,
            chips_per_host_bounds=acc.host_bounds,
            num_slices=num_slices,
        )
    except Exception as e:  # libtpu missing or unloadable: jax raises RuntimeError / JaxRuntimeError
        raise UserError(f"cannot describe {acc.name} through libtpu: {first_line(str(e))}") from None
    return list(topology.devices)


def for_tpu(config: Config) -> Config:
    """The config as a TPU run resolves it: compute_dtype "auto" is bfloat16 there (this process is on CPU)."""
    if config.model.compute_dtype != "auto":
        return config
    return config.replace(model=dataclasses.replace(config.model, compute_dtype="bfloat16"))


def build_for(config: Config, acc: Accelerator, num_slices: int) -> TrainSetup:
    """`build` on the slices' devices; a mesh that does not tile them names both."""
    devices = topology_devices(acc, num_slices)
    try:
        config.mesh.shape(len(devices))
    except ConfigError as e:
        raise ConfigError(f"{e} (topology {describe(acc, num_slices)})") from None
    return build(for_tpu(config), devices)


def describe(acc: Accelerator, num_slices: int) -> str:
    slices = f"{num_slices} slices of " if num_slices > 1 else ""
    return f"{slices}{acc.name}: {acc.chips} chips, {acc.topology}, {acc.generation.hbm_gib} GiB HBM each"


def abstract_batch(setup: TrainSetup) -> dict:
    """ShapeDtypeStructs of one global batch as data_pipelines.loader makes it: [train.batch_size, seq_len]."""
    shape = (setup.config.train.batch_size, setup.config.data.seq_len)
    leaf = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=setup.batch_sharding)
    keys = ("tokens", "targets", "segment_ids", "positions")
    return {**{k: leaf(jnp.int32) for k in keys}, "loss_mask": leaf(jnp.float32)}


class OutOfMemory(Exception):
    """The TPU compiler's own verdict that the step exceeds HBM: bytes per device it needs (at least)."""

    def __init__(self, needs: float, capacity: float):
        super().__init__(f"needs {needs} of {capacity} bytes")
        self.needs, self.capacity = needs, capacity


def compile_step(setup: TrainSetup):
    """(compiled step, seconds to trace, lower and compile it) for `setup`'s abstract state and batch."""
    step = jax.ShapeDtypeStruct((), jnp.int32)
    start = time.perf_counter()
    with jax.set_mesh(setup.mesh):
        traced = setup.step_fn.trace(setup.abstract_state, abstract_batch(setup), step)
    try:
        compiled = traced.lower().compile()
    except Exception as e:  # the compiler raises JaxRuntimeError, Pallas' lowering ValueError and others
        raise compile_failure(e, setup, traced.jaxpr.jaxpr) from None
    return compiled, time.perf_counter() - start


_SIZE = r"([\d.]+)([KMGT])"


_HBM_USED = re.compile(rf"Used {_SIZE} of {_SIZE} hbm")  # the whole program


_HBM_TEMPS = re.compile(rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)")  # arguments apart


def compile_failure(e: Exception, setup: TrainSetup, jaxpr) -> Exception:
    """OutOfMemory for the compiler's HBM verdict; else a one-line CompileError, naming the Pallas kernel that
    the compiler rejects on its own when there is one."""
    text = str(e)
    unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    size = lambda m, i: float(m[i]) * unit[m[i + 1]]
    if m := _HBM_USED.search(text):
        return OutOfMemory(size(m, 1), size(m, 3))
    if m := _HBM_TEMPS.search(text):
        arguments = shard_bytes(setup.abstract_state) + shard_bytes(abstract_batch(setup))
        return OutOfMemory(arguments + size(m, 1), size(m, 3))
    for kernel in pallas_kernels(jaxpr):
        error = kernel_error(kernel, setup.mesh.devices.flat[0])
        if error:
            return CompileError(f"the TPU compiler rejected Pallas kernel {error}")
    return CompileError(f"the TPU compiler rejected the train step: {first_line(text)}")


def pallas_kernels(jaxpr) -> list:
    """The distinct pallas_call equations of a jaxpr, nested ones (shard_map, scan, custom_vjp) included."""
    found = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.setdefault((kernel_name(eqn), *(v.aval for v in eqn.invars)), eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.update({(kernel_name(k), *(v.aval for v in k.invars)): k for k in pallas_kernels(sub)})
    return list(found.values())


def kernel_name(eqn) -> str:
    """A pallas_call's name: its `name` parameter, else the kernel function's."""
    return eqn.params.get("name") or eqn.params["jaxpr"].debug_info.func_name


def kernel_error(eqn, device) -> str:
    """`name(operand shapes): first error line` when this pallas_call fails to compile on its own, else ""."""
    one = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, sharding=one) for v in eqn.invars]
    try:
        jax.jit(lambda *xs: eqn.primitive.bind(*xs, **eqn.params)).lower(*args).compile()
    except Exception as e:
        shapes = ", ".join(v.aval.str_short() for v in eqn.invars)
        return f"{kernel_name(eqn)}({shapes}): {first_line(str(e))}"
    return ""


def first_line(text: str) -> str:
    """The first line that says something (a compiler dump starts with blank and bookkeeping lines)."""
    lines = [line.strip() for line in text.splitlines()]
    return next((line for line in lines if line and not line.startswith(("Traceback", "---", "==="))), text)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)


def memory(compiled, setup: TrainSetup) -> dict[str, int]:
    """Bytes per device: the compiler's (arguments, outputs, aliased, temporaries, code) and our split of the
    arguments. The step donates the state, so its outputs reuse the arguments' buffers: total = arguments +
    outputs - aliased + temporaries + code, what the device holds while the step runs."""
    m = compiled.memory_analysis()
    state = setup.abstract_state
    mem = {
        "params": shard_bytes(state["params"]),
        "optimizer": shard_bytes(state["opt_state"]),
        "batch": shard_bytes(abstract_batch(setup)),
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["code"]
    return mem


def step_flops(compiled, config: Config, n_devices: int) -> tuple[float, float]:
    """(XLA's FLOPs per device for one step, mct.model.flops' analytic count per device). XLA counts a loop body
    (scan_layers, grad_accum, the chunked loss) once, and counts remat's recomputed forward; mct.model.flops counts
    6 x matmul params + causal attention per token."""
    cost = compiled.cost_analysis()
    tokens = config.train.batch_size * config.data.seq_len
    analytic = flops.train_flops_per_token(config.model, config.data.seq_len) * tokens / n_devices
    return float(cost.get("flops", float("nan"))), analytic


def advice(parts: dict[str, float], config: Config, budget: float) -> str:
    """The biggest consumer of `parts` (bytes per device) and what would shrink it under `budget` bytes."""
    biggest = max(parts, key=parts.get)
    tips = []
    if biggest == "activations and temporaries":
        if config.model.remat != "full":
            tips.append("--config.model.remat=full")
        room = budget - parts["parameters"] - parts["optimizer state"]
        if room > 0:  # activations shrink with the micro-batch: about temporaries / room more micro-batches
            accum = config.train.grad_accum * 2 ** max(1, math.ceil(math.log2(parts[biggest] / room)))
            if config.train.batch_size % accum == 0:
                tips.append(f"--config.train.grad_accum={accum}")
    elif config.mesh.data != 1:
        tips.append("more fsdp (--config.mesh.data=1 --config.mesh.fsdp=-1)")
    tips.append("a larger slice")
    return f"biggest: {biggest} {parts[biggest] / GiB:.2f} GiB; try {', or '.join(tips)}"


def unrolled(config: Config, layers: int) -> Config:
    """`config` with `layers` layers and every loop of its step unrolled (layers, micro-batches, loss chunks):
    XLA's cost analysis counts a loop body once, so only such a step is counted in full."""
    model = dataclasses.replace(config.model, n_layers=layers, scan_layers=False, unroll_loops=True)
    return config.replace(model=model)


def optimal_seconds(config: Config, acc: Accelerator, num_slices: int = 1) -> float:
    """The TPU compiler's estimate of one run of `config`'s compiled step (cost_analysis' optimal_seconds)."""
    compiled, _ = compile_step(build_for(config, acc, num_slices))
    return float(compiled.cost_analysis()["optimal_seconds"])


def estimated_step_s(config: Config, acc: Accelerator, num_slices: int = 1) -> float:
    """The TPU compiler's estimate of one step's seconds with every loop counted in full: unrolled probes of
    2 and 3 layers (quick to compile at any depth) give T_2 and a layer's T_3 - T_2; step = T_2 + (layers - 2)
    x (T_3 - T_2). The first layer's difference is not the rest's (on tests/test_aot.py's 4-layer config,
    probes of 1 and 2 layers missed the unrolled compile by 2.1%, 2 and 3 layers by 0.75%)."""
    layers = config.model.n_layers
    if layers <= 2:
        return optimal_seconds(unrolled(config, layers), acc, num_slices)
    two = optimal_seconds(unrolled(config, 2), acc, num_slices)
    return two + (layers - 2) * (optimal_seconds(unrolled(config, 3), acc, num_slices) - two)


def estimate(config: Config, acc: Accelerator, num_slices: int, flops_per_device: float) -> dict:
    """estimated_step_s and estimated_mfu (mct.model.flops' count over the chip's bf16 peak), or None for both
    when a probe does not fit."""
    try:
        seconds = estimated_step_s(config, acc, num_slices)
    except OutOfMemory:  # unrolled, the loops' buffers can be live at once
        note = "no step-time estimate: an unrolled probe does not fit HBM"
        return {"estimated_step_s": None, "estimated_mfu": None, "estimate_note": note}
    return {
        "estimated_step_s": seconds,
        "estimated_mfu": flops_per_device / seconds / acc.generation.bf16_flops,
    }


def analyze(config: Config, acc: Accelerator, num_slices: int = 1, with_estimate: bool = False) -> dict:
    """Compiles `config`'s train step for `num_slices` slices of `acc`; the JSON report (bytes per device), and
    with_estimate the compiler's estimated step time when it fits."""
    setup = build_for(config, acc, num_slices)
    report = {
        "topology": acc.name,
        "num_slices": num_slices,
        "chips": acc.chips * num_slices,
        "mesh": {a: n for a, n in setup.mesh.shape.items() if a != "expert" or n > 1},  # expert: MoE only
        "hbm_per_device": acc.hbm_bytes,
    }
    start = time.perf_counter()
    try:
        compiled, report["compile_s"] = compile_step(setup)
    except OutOfMemory as oom:  # the compiler's verdict, against its own (slightly smaller) usable HBM
        parts = {
            "parameters": shard_bytes(setup.abstract_state["params"]),
            "optimizer state": shard_bytes(setup.abstract_state["opt_state"]),
        }
        parts["activations and temporaries"] = oom.needs - sum(parts.values())
        note = f"the compiler's verdict: {oom.capacity / GiB:.2f} GiB usable; "
        note += advice(parts, setup.config, oom.capacity)
        return {
            **report,
            "compile_s": time.perf_counter() - start,
            "fits": False,
            "bytes_per_device": int(oom.needs),
            "flops_per_step": None,
            "estimated_step_s": None,
            "estimated_mfu": None,
            "note": note,
        }
    mem = memory(compiled, setup)
    xla, analytic = step_flops(compiled, setup.config, setup.mesh.devices.size)
    parts = {
        "parameters": mem["params"],
        "optimizer state": mem["optimizer"],
        "batch": mem["batch"],
        "activations and temporaries": mem["temporaries"],
    }
    fits = mem["total"] <= acc.hbm_bytes
    if with_estimate and fits:
        report.update(estimate(setup.config, acc, num_slices, analytic))
    return {
        **report,
        "fits": fits,
        "bytes_per_device": mem["total"],
        "memory": mem,
        "flops_per_step": xla,
        "analytic_flops_per_step": analytic,
        "xla_loops": loops(setup.config),
        "dot_operand_types": dot_operand_types(compiled.as_text()),
        "note": advice(parts, setup.config, acc.hbm_bytes),
    }


def rank_remat(config: Config, acc: Accelerator, num_slices: int, policies: list[str]) -> list[dict]:
    """Each model.remat policy's fit, bytes per device and estimated step: those that fit first, fastest first."""
    rows = []
    for policy in policies:
        r = analyze(
            config.replace(model=dataclasses.replace(config.model, remat=policy)), acc, num_slices, True
        )
        keys = ("fits", "bytes_per_device", "estimated_step_s", "estimated_mfu")
        rows.append({"remat": policy, **{k: r[k] for k in keys}})
    fast = lambda r: (r["estimated_step_s"] is None, r["estimated_step_s"] or 0.0, r["bytes_per_device"])
    return sorted(rows, key=fast)


def describe_ranking(rows: list[dict]) -> list[str]:
    """One line a policy: the fitting ones ranked by the compiler's estimated step time."""
    lines = ["remat policies by the TPU compiler's estimated step time (those that fit):"]
    for i, r in enumerate(x for x in rows if x["estimated_step_s"] is not None):
        lines.append(
            f"  {i + 1}. {r['remat']}: {r['estimated_step_s']:.3f} s, MFU {r['estimated_mfu']:.3f}, "
            f"{r['bytes_per_device'] / GiB:.2f} GiB"
        )
    unfit = [r["remat"] for r in rows if not r["fits"]]
    return lines + ([f"  do not fit: {', '.join(unfit)}"] if unfit else [])


_DEF = re.compile(r"(%[\w.-]+) = (\w+)\[")  # an instruction's name and element type


_DOT = re.compile(r"= (\w+)\[[^\]]*\]\S* (?:dot|convolution)\(([^)]*)\)")


_OPERAND = re.compile(r"(?:(\w+)\[[^\]]*\]\S* )?(%[\w.-]+)")  # typed (CPU/GPU text) or bare (TPU)


def dot_operand_types(hlo: str) -> dict[str, int]:
    """How many dots (and convolutions) of the compiled HLO have each "lhs x rhs -> out" element type: shows
    whether model.fp8's matmuls stay f8e4m3fn on the chip or were widened by the compiler."""
    types = dict(_DEF.findall(hlo))
    counts: dict[str, int] = {}
    for out, args in _DOT.findall(hlo):
        operands = [kind or types.get(name, "?") for kind, name in _OPERAND.findall(args)][:2]
        key = f"{' x '.join(operands)} -> {out}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def loops(config: Config) -> dict[str, int]:
    """The step's loops whose body XLA's cost analysis counts once: name -> trip count."""
    m, seq = config.model, config.data.seq_len
    trips = {
        "layers (scan_layers)": m.n_layers if m.scan_layers else 1,
        "micro-batches (grad_accum)": config.train.grad_accum,
        "loss chunks (loss_chunk)": seq // m.loss_chunk if 0 < m.loss_chunk < seq else 1,
    }
    return {name: n for name, n in trips.items() if n > 1}


def describe_report(r: dict) -> list[str]:
    """The human-readable lines of a report."""
    gib = lambda n: f"{n / GiB:.2f} GiB"
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    slices = f" x {r['num_slices']} slices" if r["num_slices"] > 1 else ""
    lines = [
        f"{r['topology']}{slices} ({r['chips']} chips), mesh {mesh}: traced, lowered and compiled in "
        f"{r['compile_s']:.1f} s"
    ]
    if "memory" in r:
        m = r["memory"]
        once = ", ".join(f"1 of {n} {name}" for name, n in r["xla_loops"].items()) or "no loops"
        lines += [
            f"per device: arguments {gib(m['arguments'])} (unpadded: params {gib(m['params'])}, "
            f"optimizer {gib(m['optimizer'])}, batch {gib(m['batch'])})",
            f"  outputs {gib(m['outputs'])}, {gib(m['aliased'])} of them in the donated arguments' buffers",
            f"  temporaries (activations, gradients, update) {gib(m['temporaries'])}, code {gib(m['code'])}",
            f"  total = arguments + outputs - aliased + temporaries + code = {gib(m['total'])}",
            f"FLOPs per step per device: XLA {r['flops_per_step']:.4g} (counting {once}), "
            f"mct.model.flops {r['analytic_flops_per_step']:.4g}",
            "dots by element type: " + ", ".join(f"{k}: {n}" for k, n in r["dot_operand_types"].items()),
        ]
    if r.get("estimated_step_s") is not None:
        lines.append(
            f"estimated step (the TPU compiler's estimate, every loop counted; not a measurement): "
            f"{r['estimated_step_s']:.3f} s, MFU {r['estimated_mfu']:.3f} (mct.model.flops over the bf16 peak)"
        )
    if "estimate_note" in r:
        lines.append(r["estimate_note"])
    need, hbm = r["bytes_per_device"], r["hbm_per_device"]
    verdict = f"fits, headroom {gib(hbm - need)}" if r["fits"] else "does not fit"
    lines.append(f"needs {gib(need)} of {gib(hbm)} HBM per device: {verdict}")
    return lines


def not_fit_line(r: dict) -> str:
    return (
        f"does not fit: needs {r['bytes_per_device'] / GiB:.2f} GiB per device of "
        f"{r['hbm_per_device'] / GiB:.2f} GiB ({r['note']})"
    )
