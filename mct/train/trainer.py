"""The training stack as a library: `build(cfg)` makes everything a train step needs, `Trainer.run` is the loop.

`build` is the one setup sequence (mesh, model, optimizer, shardings, jitted step with donation): the train
entry point, the coord check, the benchmarks and the sweeps all call it. The loop asks a `StepSource` for
each step (`Batches`: the step over host batches; RL's rollouts are another source), reads each step's metrics
one step late (the host never stalls the device) and calls hooks registered with `add_hook(fn, every=N,
at=...)`; a hook that needs the state runs before the next step is dispatched (the state is donated to it),
after that step's metrics line was read, so a checkpoint never precedes its metrics.
"""

import dataclasses
import logging
import pathlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from mct.config.model import ModelConfig
from mct.config.run import Config
from mct.errors import TrainingDiverged
from mct.model.attention import pin_attention
from mct.model.decoder import ParamsModel
from mct.parallel.distributed import global_batch, stop_agreed
from mct.parallel.sharding import abstract_with_shardings, logical_spec, make_mesh, named, state_specs
from mct.train.optimizer import make_optimizer
from mct.train.schedule import schedule_from_config
from mct.train.step import Objective, make_eval_step, make_train_step, next_token_objective

log = logging.getLogger("mct.train")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """What a train step of one config needs; state = {"params": dict, "opt_state": optax state}."""

    config: Config  # resolved and validated
    mesh: Mesh
    model: ParamsModel
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: dict  # NamedShardings of the state tree
    batch_sharding: NamedSharding  # every batch leaf is [global_batch, seq]
    abstract_state: dict  # ShapeDtypeStructs with the shardings (restore and AOT targets)
    step_fn: Callable  # jitted (state, batch, step) -> (state, metrics); donates the state
    eval_fn: Callable  # jitted (params, batch) -> (loss sum, token count)

    def init_state(self, seed: int) -> dict:
        """A fresh state, created sharded."""
        model, tx = self.model, self.tx
        init = lambda: {"params": (p := model.init(seed)), "opt_state": tx.init(p)}
        with jax.set_mesh(self.mesh):
            return jax.jit(init, out_shardings=self.state_shardings)()


def build(
    config: Config,
    devices: list | None = None,
    objective: Objective = next_token_objective,
    model_fn: Callable[[ModelConfig], ParamsModel] = ParamsModel,
) -> TrainSetup:
    """Resolves and validates `config` for `devices` (default: all), then builds its model (model_fn of
    config.model: the decoder, or a draft head for it) and the jitted step minimising `objective`
    (next-token loss for pre-training; post-training passes its own)."""
    config = config.resolve()
    devices = jax.devices() if devices is None else devices
    config.validate(len(devices), len({d.process_index for d in devices}))  # hosts (AOT: the topology's)
    mesh = make_mesh(config.mesh, devices)
    model = model_fn(pin_attention(config.model, devices[0].platform))  # "auto" attention for these devices
    tx = make_optimizer(config, model)
    schedule = schedule_from_config(config)
    specs = state_specs(model.metadata("logical_axes"), tx, model.abstract())
    shardings = named(mesh, specs)
    abstract = {"params": model.abstract(), "opt_state": jax.eval_shape(tx.init, model.abstract())}
    batch_sharding = NamedSharding(mesh, logical_spec(("batch", None)))
    step_fn = jax.jit(
        make_train_step(model, tx, schedule, config.train.grad_accum, objective),
        in_shardings=(shardings, batch_sharding, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    return TrainSetup(
        config,
        mesh,
        model,
        tx,
        schedule,
        shardings,
        batch_sharding,
        abstract_with_shardings(abstract, shardings),
        step_fn,
        jax.jit(make_eval_step(model)),
    )


class StepSource(Protocol):
    """What the loop steps: `step` runs one train step of the state and returns (state, its metrics: device or
    host scalars, "ok" among them); `get_state` is what a checkpoint keeps of the source (JSON)."""

    def step(self, state: dict, step: int) -> tuple[dict, dict]: ...

    def get_state(self) -> dict: ...

    def close(self) -> None: ...


class Batches:
    """The StepSource of pre-training, SFT and DPO: setup's step over an iterator of host batches (each made
    global, leaves [global_batch, seq]); the iterator's state is the source's."""

    def __init__(self, setup: TrainSetup, batches: Iterator[dict]):
        self.setup, self.batches = setup, batches

    def step(self, state: dict, step: int) -> tuple[dict, dict]:
        batch = global_batch(next(self.batches), self.setup.batch_sharding)
        return self.setup.step_fn(state, batch, jnp.int32(step))

    def get_state(self) -> dict:
        return self.batches.get_state()

    def close(self) -> None:
        getattr(self.batches, "close", lambda: None)()  # a prefetch thread


class SavedSteps(Protocol):
    """A run's checkpoints as the non-finite guard names them (mct.run.checkpoint.Checkpointer)."""

    directory: pathlib.Path

    def latest_step(self) -> int | None: ...


@dataclasses.dataclass
class StepInfo:
    """What a hook sees: the step just finished, its host metrics, and the state (None for metrics-only hooks)."""

    step: int
    metrics: dict
    state: dict | None


@dataclasses.dataclass(frozen=True)
class Hook:
    fn: Callable[[StepInfo], None]
    every: int
    at: frozenset[int]
    needs_state: bool

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step in self.at


class Trainer:
    """The loop of a StepSource's steps on `setup`'s mesh, with hooks and a non-finite guard (which names the
    last good step of `checkpoints`, when given)."""

    def __init__(
        self, setup: TrainSetup, stop: threading.Event | None = None, checkpoints: SavedSteps | None = None
    ):
        self.setup = setup
        self.stop = stop or threading.Event()
        self.checkpoints = checkpoints
        self.hooks: list[Hook] = []
        self.nonfinite_run = self.nonfinite_total = 0  # consecutive and total steps with a skipped update

    def add_hook(
        self,
        fn: Callable[[StepInfo], None],
        *,
        every: int = 0,
        at: Iterable[int] = (),
        needs_state: bool = False,
    ) -> None:
        """Calls fn after every `every`-th step and at the steps `at`. A hook that needs the state runs before
        the next step is dispatched; the others run when the step's metrics are read (one step late)."""
        self.hooks.append(Hook(fn, every, frozenset(at), needs_state))

    def run(self, state: dict, source: StepSource, start: int, steps: int) -> tuple[dict, int]:
        """Steps from `start` to `steps` (or until `stop` is set); returns the state and the step reached."""
        pending = None  # (step, device metrics) not read yet
        step = start
        with jax.set_mesh(self.setup.mesh):
            while step < steps and not stop_agreed(self.stop, step):
                state, metrics = source.step(state, step)
                if pending is not None:
                    self._read(*pending)
                step, pending = step + 1, (step + 1, metrics)
                stateful = [h for h in self.hooks if h.needs_state and h.due(step)]
                if stateful:
                    host = self._read(*pending)
                    pending = None
                    for hook in stateful:
                        hook.fn(StepInfo(step, host, state))
            if pending is not None:
                self._read(*pending)
        return state, step

    def _read(self, step: int, device_metrics: dict) -> dict:
        """Host metrics of a finished step: counts non-finite steps, runs the metrics-only hooks due."""
        m = {k: np.asarray(v).item() for k, v in jax.device_get(device_metrics).items()}
        if not m["ok"]:
            self.nonfinite_run, self.nonfinite_total = self.nonfinite_run + 1, self.nonfinite_total + 1
            log.warning("step %d: non-finite loss or gradient, update skipped", step)
            limit = self.setup.config.train.max_consecutive_nonfinite
            if self.nonfinite_run >= limit:
                raise TrainingDiverged(
                    f"stopping: {self.nonfinite_run} consecutive non-finite steps up to step {step} "
                    f"(train.max_consecutive_nonfinite); last good checkpoint: {self.last_good_checkpoint()}"
                )
        else:
            self.nonfinite_run = 0
        m["nonfinite_steps"] = self.nonfinite_total
        for hook in self.hooks:
            if not hook.needs_state and hook.due(step):
                hook.fn(StepInfo(step, m, None))
        return m

    def last_good_checkpoint(self) -> str:
        """Where the run's latest checkpoint is, for the message of a diverged run."""
        c = self.checkpoints
        return "none" if c is None else f"step {c.latest_step()} in {c.directory}"
