"""Post-training starts from another run's params: `init_from = WORKDIR[:STEP]` (default: its latest step).

Only the params are read (one at a time by mct.run.checkpoint, straight onto the new run's shardings); the
optimizer state is fresh. The source's final learning rate comes from its own config and schedule at that step,
so SFT's WSD can continue from it (MiniCPM paper section 4: SFT continues from the end of the decay).
"""

import dataclasses
import pathlib

import jax

from mct.config.run import Config
from mct.errors import UserError
from mct.run.reader import RunCheckpoint
from mct.train.schedule import schedule_from_config
from mct.train.trainer import TrainSetup


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A committed checkpoint of a source run, opened once: its reader, its resolved config and its lr there."""

    run: RunCheckpoint
    config: Config  # resolved
    final_lr: float  # the source schedule's lr at run.step


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
    try:
        run = RunCheckpoint(*parse_spec(spec))
    except (OSError, ValueError) as e:
        raise UserError(f"config init_from={spec}: {e}") from None
    config = run.config.resolve()
    return InitSource(run, config, float(schedule_from_config(config)(run.step)))


def with_init_lr(config: Config) -> Config:
    """With schedule.lr_from_init, `config` whose peak lr (optimizer.lr) is init_from's final lr."""
    if not config.schedule.lr_from_init:
        return config
    lr = read_init_source(config.init_from).final_lr
    if not lr > 0:
        raise UserError(
            f"config init_from={config.init_from}: its final lr is {lr}; set optimizer.lr and "
            "schedule.lr_from_init=false"
        )
    return config.replace(optimizer=dataclasses.replace(config.optimizer, lr=lr))


def load_init_params(spec: str, setup: TrainSetup) -> dict:
    """The params of `spec`'s checkpoint, sharded as setup.state_shardings["params"]; UserError (naming the
    workdir) when the source's model shape differs from setup's or a parameter cannot be read."""
    checkpoint = read_init_source(spec).run.checkpoint
    try:
        checkpoint.check_compatible(setup.config.model)
        return checkpoint.read_params(setup.abstract_state["params"])
    except ValueError as e:  # a ConfigError, or a parameter that cannot be read
        raise UserError(f"config init_from={spec}: {e}") from None


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
    return source.run.checkpoint.data_state if source.config.data == config.data else None
