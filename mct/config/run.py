"""The run configuration: typed, frozen dataclasses with every default and every cross-field check.

Experiment files (`experiments/configs/*.py`) are ml_collections ConfigDicts for the command line; an entry
point converts one exactly once with `Config.from_dict(cd.to_dict())` (or its own run class's, e.g.
`mct.config.posttrain.RLRunConfig`), which names any unknown key (with a suggestion), then `resolve()` turns
schedule fractions into steps and `validate(n_devices)` checks the rest before anything compiles. A config a
checkpoint saved is read back with `from_saved`.
"""

import dataclasses
import math

from data_pipelines.batch_layout import BatchLayout
from data_pipelines.config import DataConfig
from mct.config.model import ModelConfig, check_model, check_sharding
from mct.config.schema import build, check_finite, require, to_dict
from mct.errors import ConfigError

DECAY_SHAPES = ("exponential", "linear", "cosine", "1-sqrt")
MESH_AXES = ("data", "fsdp", "expert", "tensor")
POSTTRAIN_SECTIONS = ("dpo", "rl", "eagle")  # the sections mct.config.posttrain's run configs add to Config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # global, in sequences
    grad_accum: int = 1  # micro-batches per step; batch_size must divide evenly
    log_every_steps: int = 10
    max_consecutive_nonfinite: int = 5


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 0.01  # peak lr (muP: hidden matrices get lr / m)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Warmup-Stable-Decay (MiniCPM paper section 4.2): warmup and decay as fractions of train.steps, or
    absolute steps when warmup_steps / decay_steps are >= 0 (resolve() fills them in)."""

    warmup_fraction: float = 0.1
    decay_fraction: float = 0.1  # the decay phase is the last decay_fraction of train.steps
    warmup_steps: int = -1
    decay_steps: int = -1
    decay_shape: str = "exponential"  # DECAY_SHAPES
    half_life: int = 0  # exponential decay half-life in steps (0 -> decay_steps / 5)
    lr_min: float = 0.0
    branch_from: str = ""  # workdir of a stable run to branch a decay from
    branch_step: int = -1  # its checkpoint step; the branch decays over the next decay_steps
    lr_from_init: bool = False  # post-training: the peak lr is init_from's final lr (MiniCPM SFT convention)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; at most one may be -1 (all remaining devices)."""

    data: int = -1
    fsdp: int = 1
    expert: int = (
        1  # MoE expert parallelism: experts split over it, and the batch too (a data axis elsewhere)
    )
    tensor: int = 1

    def shape(self, n_devices: int) -> tuple[int, int, int, int]:
        """Sizes of (data, fsdp, expert, tensor) on n_devices."""
        sizes = [getattr(self, a) for a in MESH_AXES]
        named = dict(zip(MESH_AXES, sizes))
        if sizes.count(-1) > 1:
            raise ConfigError(f"config mesh: at most one axis may be -1, got {named}")
        known = math.prod(s for s in sizes if s != -1)
        if any(s == 0 or s < -1 for s in sizes) or n_devices % known:
            raise ConfigError(f"config mesh {named} does not fit the {n_devices} available devices")
        sizes = [n_devices // known if s == -1 else s for s in sizes]
        if math.prod(sizes) != n_devices:
            raise ConfigError(
                f"config mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices "
                f"but {n_devices} are available (set one axis to -1 to take the rest)"
            )
        return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 50
    max_to_keep: int = 3
    async_save: bool = True
    allow_fresh_start: bool = False  # start from step 0 although every checkpoint was moved aside


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 50  # batches per eval: data.eval_batches
    scalingbench: str = ""  # "" (off), "default" (embedded) or a JSONL path
    tasks: str = (
        ""  # downstream task files ([NAME=]PATH,...; mct.run.task_files), logged as task/<name>/<metric>
    )
    tasks_every_steps: int = 0  # 0: every eval.every_steps


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    steps: tuple[int, ...] = ()  # (first, last): a jax.profiler trace of these steps into WORKDIR/profile


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run: pre-training's sections, which every run shares (post-training entry points extend
    it with their own sections: mct.config.posttrain)."""

    workdir: str = ""
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    profile: ProfileConfig = ProfileConfig()
    init_from: str = ""  # post-training: WORKDIR[:STEP] whose params (not optimizer state) start the run

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """The config of a nested dict (e.g. ConfigDict.to_dict()); unknown keys are ConfigErrors."""
        return build(cls, values)

    @classmethod
    def from_saved(cls, values: dict) -> "Config":
        """The config a checkpoint's run_meta recorded, read as `cls`: the post-training sections `cls` has no
        field for are dropped (checkpoints saved before the split carry `dpo` and `rl` in every config, and a
        post-training run's carry its own), any other unknown key is a ConfigError as in `from_dict`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in values.items() if k in fields or k not in POSTTRAIN_SECTIONS})

    def to_dict(self) -> dict:
        """Plain nested dicts and lists (JSON): what checkpoints record."""
        return to_dict(self)

    def replace(self, **sections) -> "Config":
        return dataclasses.replace(self, **sections)

    def resolve(self) -> "Config":
        """Absolute warmup and decay steps; a decay branch's train.steps = branch_step + decay_steps."""
        s, steps = self.schedule, self.train.steps
        if s.branch_from:
            # a branch is the last decay_fraction of a run that reached branch_step in its stable phase
            decay = (
                s.decay_steps
                if s.decay_steps >= 0
                else round(s.branch_step * s.decay_fraction / (1 - s.decay_fraction))
            )
            steps = s.branch_step + decay
        else:
            decay = s.decay_steps if s.decay_steps >= 0 else round(s.decay_fraction * steps)
        warmup = s.warmup_steps if s.warmup_steps >= 0 else round(s.warmup_fraction * steps)
        schedule = dataclasses.replace(s, warmup_steps=warmup, decay_steps=decay)
        return self.replace(schedule=schedule, train=dataclasses.replace(self.train, steps=steps))

    @property
    def decay_start(self) -> int:
        """The first step of the decay phase (resolved configs)."""
        return self.train.steps - self.schedule.decay_steps

    def validate(self, n_devices: int, n_processes: int = 1) -> None:
        """Raises ConfigError for a resolved config that cannot run on n_devices devices in n_processes."""
        check_finite(self.to_dict())  # every section's, post-training's too
        check_model(self.model)
        check_ranges(self)  # values first, then their fit to the devices
        data, fsdp, expert, tensor = self.mesh.shape(n_devices)
        check_sharding(self.model, tensor, fsdp, expert)
        check_batch(self, data * fsdp * expert, n_processes)


def check_ranges(c: "Config") -> None:
    """Ranges of the train, data, optimizer, schedule and checkpoint settings."""
    t, d, s = c.train, c.data, c.schedule
    require(t.steps >= 0, f"train.steps={t.steps} must be >= 0")
    require(
        t.batch_size > 0 and t.grad_accum > 0,
        f"train.batch_size={t.batch_size} and train.grad_accum={t.grad_accum} must be positive",
    )
    require(
        0 < d.seq_len <= c.model.max_position,
        f"data.seq_len={d.seq_len} must be in [1, model.max_position={c.model.max_position}]",
    )
    require(
        0 < t.log_every_steps and 0 < c.eval.every_steps and 0 < c.checkpoint.every_steps,
        "train.log_every_steps, eval.every_steps and checkpoint.every_steps must be positive",
    )
    require(
        c.eval.tasks_every_steps >= 0,
        f"eval.tasks_every_steps={c.eval.tasks_every_steps} must be >= 0 (0: every eval.every_steps)",
    )
    chunk = c.model.loss_chunk
    require(
        not (0 < chunk < d.seq_len and d.seq_len % chunk),
        f"model.loss_chunk={chunk} does not divide data.seq_len={d.seq_len}",
    )
    require(
        s.decay_shape in DECAY_SHAPES, f"schedule.decay_shape={s.decay_shape!r} is not one of {DECAY_SHAPES}"
    )
    require(
        0 <= s.warmup_fraction <= 1 and 0 <= s.decay_fraction < 1,
        "schedule.warmup_fraction must be in [0, 1] and schedule.decay_fraction in [0, 1)",
    )
    require(
        not s.branch_from or s.branch_step >= 0, "schedule.branch_from is set but schedule.branch_step is not"
    )
    require(
        s.branch_from or s.warmup_steps + s.decay_steps <= t.steps,
        f"schedule warmup + decay = {s.warmup_steps + s.decay_steps} steps exceeds train.steps={t.steps}",
    )
    require(
        s.half_life >= 0 and s.lr_min >= 0,
        f"schedule.half_life={s.half_life} (0 = decay_steps / 5) and schedule.lr_min={s.lr_min} must be >= 0 "
        "(a negative one grows or flips the lr)",
    )
    profile = c.profile.steps
    require(
        profile == () or len(profile) == 2 and profile[0] < profile[1],
        f"profile.steps={profile} must be () or (first, last) with first < last",
    )
    require(not s.lr_from_init or c.init_from, "schedule.lr_from_init needs init_from=WORKDIR[:STEP]")
    require(
        c.checkpoint.max_to_keep > 0,
        f"checkpoint.max_to_keep={c.checkpoint.max_to_keep} must be positive (0 would delete every checkpoint, "
        "the one just saved too)",
    )
    check_optimizer(c.optimizer)
    check_data(d)


def check_optimizer(o: OptimizerConfig) -> None:
    """AdamW's settings: each outside its range stalls, flips or NaNs the updates."""
    require(o.lr > 0, f"optimizer.lr={o.lr} must be positive")
    require(
        o.grad_clip > 0,
        f"optimizer.grad_clip={o.grad_clip} must be positive: the global gradient norm's cap (0 zeroes every "
        "update, a negative cap flips it; a large one, e.g. 1e9, clips nothing)",
    )
    require(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optimizer.b1={o.b1} and optimizer.b2={o.b2} must be in [0, 1)")
    require(o.eps > 0, f"optimizer.eps={o.eps} must be positive (0: a zero gradient's update is 0 / 0)")
    require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")


def check_data(d: DataConfig) -> None:
    """The loader's counts: evaluation batches, epochs, packing bins and prefetched batches."""
    require(
        d.eval_batches > 0,
        f"data.eval_batches={d.eval_batches} must be positive (0 batches would log an eval_loss of 0.0)",
    )
    require(d.num_epochs >= 0, f"data.num_epochs={d.num_epochs} must be >= 0 (0 = repeat forever)")
    require(d.packing_bins > 0, f"data.packing_bins={d.packing_bins} must be positive")
    require(d.prefetch >= 0, f"data.prefetch={d.prefetch} must be >= 0 (0 = on the training thread)")


def check_batch(c: "Config", data_parallel: int, n_processes: int) -> None:
    """The global batch's fit to the data-parallel devices, the processes and the logical data shards."""
    t, d = c.train, c.data
    require(
        t.batch_size % t.grad_accum == 0,
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
    )
    micro = t.batch_size // t.grad_accum
    require(
        micro % data_parallel == 0,
        f"train.batch_size={t.batch_size} (micro-batch {micro}) is not divisible by "
        f"mesh data x fsdp x expert = {data_parallel} data-parallel devices",
    )
    require(
        t.batch_size % n_processes == 0,
        f"train.batch_size={t.batch_size} is not divisible by the {n_processes} processes",
    )
    try:
        BatchLayout(d.num_logical_shards, t.batch_size, n_processes)
    except ValueError as e:
        raise ConfigError(f"config data/train: {e}") from None
