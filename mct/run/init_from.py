"""Post-training starts from another run's params: `init_from = WORKDIR[:STEP]` (default: its latest step).

Only the params are read (orbax partial restore, straight onto the new run's shardings); the optimizer state
is fresh. The source's final learning rate comes from its own config and schedule at that step, so SFT's WSD
can continue from it (MiniCPM paper section 4: SFT continues from the end of the decay).
"""

import dataclasses
import pathlib

import jax
import orbax.checkpoint as ocp

from mct.config.run import Config
from mct.errors import CheckpointMissing, ConfigError, UserError
from mct.run.checkpoint import Checkpointer
from mct.train.schedule import schedule_from_config
from mct.train.trainer import TrainSetup


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A committed checkpoint of a source run: where, which step, its config and its lr there."""

    workdir: pathlib.Path
    step: int
    config: Config  # resolved
    final_lr: float  # the source schedule's lr at `step`


def parse_spec(spec: str) -> tuple[pathlib.Path, int | None]:
    """(workdir, step or None) of "WORKDIR[:STEP]"."""
    if not spec:
        raise UserError("config init_from is empty: pass --config.init_from=WORKDIR[:STEP]")
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit():
        return pathlib.Path(head), int(tail)
    return pathlib.Path(spec), None


def read_init_source(spec: str) -> InitSource:
    """The source run of `spec`; UserError naming the workdir when it has no such committed checkpoint."""
    workdir, step = parse_spec(spec)
    try:
        ckpt = Checkpointer(str(workdir), read_only=True)
    except CheckpointMissing:
        raise UserError(
            f"config init_from={spec}: {workdir} is not a training workdir (no checkpoints/)"
        ) from None
    try:
        steps = ckpt.all_steps()
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in steps:
            raise UserError(f"config init_from={spec}: no committed checkpoint at step {step} in {workdir} "
                            f"(have {steps})")  # fmt: skip
        meta = ckpt.read_meta(step)
    finally:
        ckpt.close()
    if "config" not in meta:
        raise UserError(
            f"config init_from={spec}: the checkpoint meta of {workdir} step {step} lacks the config"
        )
    config = Config.from_saved(meta["config"]).resolve()
    return InitSource(workdir, step, config, float(schedule_from_config(config)(step)))


def with_init_lr(config: Config) -> Config:
    """With schedule.lr_from_init, `config` whose peak lr (optimizer.lr) is init_from's final lr."""
    if not config.schedule.lr_from_init:
        return config
    lr = read_init_source(config.init_from).final_lr
    if not lr > 0:
        raise UserError(f"config init_from={config.init_from}: its final lr is {lr}; set optimizer.lr and "
                        "schedule.lr_from_init=false")  # fmt: skip
    return config.replace(optimizer=dataclasses.replace(config.optimizer, lr=lr))


def load_init_params(spec: str, setup: TrainSetup) -> dict:
    """The params of `spec`'s checkpoint, sharded as setup.state_shardings["params"]; UserError (naming the
    workdir) when the source's model shape differs from setup's."""
    source = read_init_source(spec)
    ckpt = Checkpointer(str(source.workdir), read_only=True)
    try:
        ckpt.check_compatible(source.step, setup.config.model)
    except ConfigError as e:
        raise UserError(f"config init_from={spec}: {e}") from None
    finally:
        ckpt.close()
    abstract = setup.abstract_state["params"]
    args = ocp.args.PyTreeRestore(
        item={"params": abstract}, partial_restore=True,
        restore_args={"params": {k: ocp.ArrayRestoreArgs(sharding=x.sharding) for k, x in abstract.items()}},
    )  # fmt: skip
    state_dir = source.workdir.absolute() / "checkpoints" / str(source.step) / "state"
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            params = checkpointer.restore(state_dir, args=args)["params"]
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"config init_from={spec}: cannot read the params of {state_dir} "
                        f"({str(e).splitlines()[0][:200]})") from None  # fmt: skip
    for name, x in abstract.items():
        if params[name].shape != x.shape:
            raise UserError(f"config init_from={spec}: parameter {name!r} of {source.workdir} has shape "
                            f"{params[name].shape}, the run needs {x.shape}")  # fmt: skip
    return params


def init_from_state(spec: str, setup: TrainSetup) -> dict:
    """A train state of `spec`'s params and a fresh optimizer state, sharded as setup.state_shardings."""
    params = load_init_params(spec, setup)
    with jax.set_mesh(setup.mesh):
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state}


def continued_data_state(spec: str, config: Config) -> dict | None:
    """The source's data-iterator state when `config` reads the same data as the source (BitCPM stage 2 QAT
    continues the pre-training stream instead of re-reading its first batches); None for other data (SFT)."""
    source = read_init_source(spec)
    if source.config.data != config.data:
        return None
    ckpt = Checkpointer(str(source.workdir), read_only=True)
    try:
        return ckpt.read_data_state(source.step)
    finally:
        ckpt.close()
