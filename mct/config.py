"""The run configuration: typed, frozen dataclasses with every default and every cross-field check.

Experiment files (`experiments/configs/*.py`) are ml_collections ConfigDicts for the command line; an entry
point converts one exactly once with `Config.from_dict(cd.to_dict())`, which names any unknown key (with a
suggestion), then `resolve()` turns schedule fractions into steps and `validate(n_devices)` checks the rest
before anything compiles. The model config is hashable: it keys jit caches and decoding's compiled steps.
"""

import dataclasses
import difflib
import math
import types
import typing
from typing import Any

from data_pipelines.batch_layout import BatchLayout
from data_pipelines.config import DataConfig, MixtureComponent
from pallas_kernels.infllm_v2 import IMPLEMENTATIONS as SPARSE_IMPLEMENTATIONS
from pallas_kernels.infllm_v2 import SparseConfig

ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise", "naive", "splash", "flash_gpu", "infllm_v2")
ROPE_TYPES = ("default", "linear", "llama3", "longrope")
DECAY_SHAPES = ("exponential", "linear", "cosine", "1-sqrt")
REMAT_NAMES = (
    "none", "full", "minimal", "save_qkv_proj", "save_attn_out", "save_dot_except_mlp", "offload_residual",
    "save_residual", "dots_saveable", "dots_with_no_batch_dims_saveable",
)  # fmt: skip
MESH_AXES = ("data", "fsdp", "expert", "tensor")
QUANT_WEIGHTS = ("none", "ternary")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the config keys involved."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE: `default`; `linear` (positions / factor); `llama3` (wavelength-banded factors); `longrope`
    (per-frequency factors, the short list up to original_max_position; cos/sin scaled by attention_factor,
    0 = sqrt(1 + ln(max/orig) / ln(orig)))."""

    theta: float = 10000.0
    type: str = "default"
    original_max_position: int = 32768
    short_factor: tuple[float, ...] = ()  # longrope: one factor per frequency (head_dim // 2); () = all 1
    long_factor: tuple[float, ...] = ()
    factor: float = 1.0  # linear, llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    attention_factor: float = 0.0  # longrope: cos/sin magnitude (0 = derived from the lengths)


@dataclasses.dataclass(frozen=True)
class SparseSettings(SparseConfig):
    """InfLLM v2 settings (MiniCPM4 report section 2.1) plus which kernel implementation runs them."""

    implementation: str = "xla"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """BitCPM weight quantisation in the forward pass (mct/quant.py): "none", or "ternary" ({-1, 0, 1} x a
    per-group absmean scale over group_size consecutive inputs of every hidden matrix, trained with an STE)."""

    weights: str = "none"
    group_size: int = 32


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (MiniCPM4 report section 2.3.2): `depth` extra blocks (0 = off), block k on
    Linear(concat(RMSNorm(h_i), RMSNorm(Emb(x_{i+k})))) predicting x_{i+k+1}; L = L_ntp + loss_weight * L_mtp
    (the report gives no weight: 0.3 is ours)."""

    depth: int = 0
    loss_weight: float = 0.3


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts in every MLP (MiniCPM paper section 7, MiniCPM-MoE): `num_experts` SwiGLU experts
    (0 = dense), the top_k of a softmax router; load-balancing loss x aux_loss_weight, router z-loss x
    z_loss_weight; capacity_factor > 0 caps each expert at ceil(factor * tokens * top_k / experts) tokens
    (the rest dropped, counted in the metrics), 0 = dropless."""

    num_experts: int = 0
    top_k: int = 2
    router_init_std: float = 0.01
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    capacity_factor: float = 0.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A MiniCPM decoder with muP (MiniCPM paper section 4; docs/design.md): only the shape is required."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    d_mlp: int = 160
    vocab_size: int = 1024
    tie_embeddings: bool = True
    rms_eps: float = 1e-5
    max_position: int = 32768
    parametrization: str = "mup"  # "sp" turns the width multiplier off (coord checks)
    scale_emb: float = 12.0
    scale_depth: float = 1.4
    dim_model_base: int = 256
    init_std: float = 0.1
    rope: RopeConfig = RopeConfig()
    # Attention dispatch (mct/attention.py): "auto" (splash on TPU, the Pallas flash kernel on GPU, blockwise
    # on CPU), "blockwise" (flash-style XLA), "naive" (materialised scores), "splash", "flash_gpu",
    # "infllm_v2" (trainable sparse; model.dense_attention below sparse.dense_len).
    attention: str = "auto"
    dense_attention: str = "auto"  # InfLLM v2's kernel below sparse.dense_len (any dense choice above)
    attention_block: int = 128  # blockwise attention tile (128 measured fastest at seq 1024 on CPU)
    sparse: SparseSettings = SparseSettings()
    compute_dtype: str = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU; params stay float32
    scan_layers: bool = True  # lax.scan over the stacked layers (False: unrolled, slower compile)
    remat: str = "none"  # REMAT_NAMES: the jax.checkpoint policy of a layer
    loss_chunk: int = 0  # tokens per cross-entropy chunk (0 = whole sequence at once)
    mtp: MTPConfig = MTPConfig()
    moe: MoEConfig = MoEConfig()
    fp8: bool = False  # linear layers in float8_e4m3fn with block scales (mct/fp8.py); attention, head stay bf16
    quant: QuantConfig = QuantConfig()


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
    expert: int = 1  # MoE expert parallelism: experts split over it, and the batch too (a data axis elsewhere)
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


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    steps: tuple[int, ...] = ()  # (first, last): a jax.profiler trace of these steps into WORKDIR/profile


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (mct/dpo.py): -log sigmoid(beta * margin of policy/reference log-ratios),
    plus sft_weight x the chosen answers' token loss (OpenBMB's script: beta 0.1, weight 0.5)."""

    path: tuple[str, ...] = ("default",)  # preference JSONL files ({"prompt", "chosen", "rejected"}) or "default"
    beta: float = 0.1
    sft_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """RL with chunk-wise rollout (mct/rl.py; MiniCPM4 report section 3.2): GRPO advantages over group_size
    rollouts per prompt, dynamic sampling, clip-higher, dual clip, KL to a reference refreshed every
    ref_refresh_steps, overlong filtering; each step decodes at most chunk_tokens per trajectory."""

    prompts: str = ""  # JSONL of {"prompt", "answer"} or {"prompt", "tests"}; "" = embedded arithmetic task
    reward: str = "numeric"  # exact | numeric | python_tests (mct/rewards.py)
    group_size: int = 16  # rollouts per prompt (G)
    prompts_per_step: int = 8  # new prompts (groups) entering the rollout each step
    chunk_tokens: int = 8192  # new tokens per trajectory per step (>= max_response_tokens: full-length rollout)
    max_prompt_tokens: int = 1024
    max_response_tokens: int = 32768
    temperature: float = 1.0
    top_p: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28  # clip-higher (DAPO)
    dual_clip: float = 3.0  # c of the dual clip, for negative advantages
    kl_beta: float = 0.001
    ref_refresh_steps: int = 100  # the reference becomes the current policy every this many steps
    overlong_filter: bool = True  # no loss on trajectories cut at max_response_tokens
    lr: float = 1e-5  # constant (replaces optimizer.lr and the WSD schedule in RL runs)


@dataclasses.dataclass(frozen=True)
class Config:
    """One training run."""

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
    dpo: DPOConfig = DPOConfig()
    rl: RLConfig = RLConfig()

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """The config of a nested dict (e.g. ConfigDict.to_dict()); unknown keys are ConfigErrors."""
        return build(cls, values)

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
        check_model(self.model)
        check_ranges(self)  # values first, then their fit to the devices
        data, fsdp, expert, tensor = self.mesh.shape(n_devices)
        check_sharding(self.model, tensor, fsdp, expert)
        check_batch(self, data * fsdp * expert, n_processes)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(f"config {message}")


def check_sharding(m: ModelConfig, tensor: int, fsdp: int, expert: int = 1) -> None:
    """The model's fit to the tensor, fsdp and expert mesh axes it is sharded over."""
    _require(
        m.moe.num_experts % expert == 0,
        f"model.moe.num_experts={m.moe.num_experts} is not divisible by mesh.expert={expert}",
    )
    for key in ("n_heads", "n_kv_heads", "d_mlp", "vocab_size"):
        _require(
            getattr(m, key) % tensor == 0,
            f"model.{key}={getattr(m, key)} is not divisible by mesh.tensor={tensor}",
        )
    _require(m.d_model % fsdp == 0, f"model.d_model={m.d_model} is not divisible by mesh.fsdp={fsdp}")


def check_model(m: ModelConfig) -> None:
    """The model's own constraints."""
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "vocab_size"):
        _require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    _require(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}",
    )
    _require(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for RoPE")
    _require(
        m.attention in ATTENTION_IMPLEMENTATIONS,
        f"model.attention={m.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}",
    )
    _require(
        m.dense_attention in ATTENTION_IMPLEMENTATIONS and m.dense_attention != "infllm_v2",
        f"model.dense_attention={m.dense_attention!r} is not a dense one of {ATTENTION_IMPLEMENTATIONS}",
    )
    _require(
        m.parametrization in ("mup", "sp"),
        f"model.parametrization={m.parametrization!r} must be 'mup' or 'sp'",
    )
    _require(m.remat in REMAT_NAMES, f"model.remat={m.remat!r} is not one of {REMAT_NAMES}")
    _require(m.rope.type in ROPE_TYPES, f"model.rope.type={m.rope.type!r} is not one of {ROPE_TYPES}")
    _require(m.max_position > 0, f"model.max_position={m.max_position} must be positive")
    check_quant(m)
    _require(m.mtp.depth >= 0 and m.mtp.loss_weight >= 0, f"model.mtp {m.mtp} needs depth, loss_weight >= 0")
    _require(m.moe.num_experts >= 0, f"model.moe.num_experts={m.moe.num_experts} must be >= 0 (0 = dense)")
    if m.moe.num_experts:
        _require(
            0 < m.moe.top_k <= m.moe.num_experts and m.moe.capacity_factor >= 0,
            f"model.moe.top_k={m.moe.top_k} must be in [1, num_experts={m.moe.num_experts}] and "
            f"model.moe.capacity_factor={m.moe.capacity_factor} >= 0",
        )
    if m.attention == "infllm_v2":
        _require(
            not m.sparse.use_nope,
            "model.sparse.use_nope=True is not supported: the model selects blocks "
            "from q, k after RoPE (MiniCPM4's setting)",
        )
        _require(
            m.sparse.implementation in SPARSE_IMPLEMENTATIONS,
            f"model.sparse.implementation={m.sparse.implementation!r} is not one of {SPARSE_IMPLEMENTATIONS}",
        )


def check_quant(m: ModelConfig) -> None:
    """model.quant: a known scheme whose group size divides every quantised matrix's input dimension."""
    q = m.quant
    _require(q.weights in QUANT_WEIGHTS, f"model.quant.weights={q.weights!r} is not one of {QUANT_WEIGHTS}")
    if q.weights == "none":
        return
    _require(q.group_size > 0, f"model.quant.group_size={q.group_size} must be positive")
    inputs = {"d_model": m.d_model, "n_heads * head_dim": m.n_heads * m.head_dim, "d_mlp": m.d_mlp}
    for name, size in inputs.items():
        _require(
            size % q.group_size == 0,
            f"model.quant.group_size={q.group_size} does not divide the input dimension model.{name}={size}",
        )


def check_ranges(c: "Config") -> None:
    """Ranges of the train, data, optimizer and schedule settings."""
    t, d, s, o = c.train, c.data, c.schedule, c.optimizer
    _require(t.steps >= 0, f"train.steps={t.steps} must be >= 0")
    _require(
        t.batch_size > 0 and t.grad_accum > 0,
        f"train.batch_size={t.batch_size} and train.grad_accum={t.grad_accum} must be positive",
    )
    _require(
        0 < d.seq_len <= c.model.max_position,
        f"data.seq_len={d.seq_len} must be in [1, model.max_position={c.model.max_position}]",
    )
    _require(o.lr > 0, f"optimizer.lr={o.lr} must be positive")
    _require(
        0 < t.log_every_steps and 0 < c.eval.every_steps and 0 < c.checkpoint.every_steps,
        "train.log_every_steps, eval.every_steps and checkpoint.every_steps must be positive",
    )
    chunk = c.model.loss_chunk
    _require(
        not (0 < chunk < d.seq_len and d.seq_len % chunk),
        f"model.loss_chunk={chunk} does not divide data.seq_len={d.seq_len}",
    )
    _require(
        s.decay_shape in DECAY_SHAPES, f"schedule.decay_shape={s.decay_shape!r} is not one of {DECAY_SHAPES}"
    )
    _require(
        0 <= s.warmup_fraction <= 1 and 0 <= s.decay_fraction < 1,
        "schedule.warmup_fraction must be in [0, 1] and schedule.decay_fraction in [0, 1)",
    )
    _require(
        not s.branch_from or s.branch_step >= 0, "schedule.branch_from is set but schedule.branch_step is not"
    )
    _require(
        s.branch_from or s.warmup_steps + s.decay_steps <= t.steps,
        f"schedule warmup + decay = {s.warmup_steps + s.decay_steps} steps exceeds train.steps={t.steps}",
    )
    _require(len(c.profile.steps) in (0, 2), f"profile.steps={c.profile.steps} must be () or (first, last)")
    _require(not s.lr_from_init or c.init_from, "schedule.lr_from_init needs init_from=WORKDIR[:STEP]")
    _require(c.dpo.beta > 0 and c.dpo.sft_weight >= 0, f"dpo.beta={c.dpo.beta} must be > 0, dpo.sft_weight >= 0")
    check_rl(c.rl)


def check_rl(r: RLConfig) -> None:
    """Ranges of the RL settings."""
    for key in ("group_size", "prompts_per_step", "chunk_tokens", "max_prompt_tokens", "max_response_tokens",
                "ref_refresh_steps"):  # fmt: skip
        _require(getattr(r, key) > 0, f"rl.{key}={getattr(r, key)} must be positive")
    _require(r.group_size > 1, f"rl.group_size={r.group_size} must be > 1 (advantages are relative to the group)")
    _require(r.reward in ("exact", "numeric", "python_tests"),
             f"rl.reward={r.reward!r} is not one of exact, numeric, python_tests")  # fmt: skip
    _require(r.temperature >= 0 and 0 < r.top_p <= 1, f"rl.temperature={r.temperature} must be >= 0 and "
             f"rl.top_p={r.top_p} in (0, 1]")  # fmt: skip
    _require(0 <= r.eps_low < 1 and r.eps_high >= 0, f"rl.eps_low={r.eps_low} must be in [0, 1), rl.eps_high >= 0")
    _require(r.dual_clip > 1, f"rl.dual_clip={r.dual_clip} must be > 1")
    _require(r.kl_beta >= 0 and r.lr > 0, f"rl.kl_beta={r.kl_beta} must be >= 0 and rl.lr={r.lr} > 0")


def check_batch(c: "Config", data_parallel: int, n_processes: int) -> None:
    """The global batch's fit to the data-parallel devices, the processes and the logical data shards."""
    t, d = c.train, c.data
    _require(
        t.batch_size % t.grad_accum == 0,
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
    )
    micro = t.batch_size // t.grad_accum
    _require(
        micro % data_parallel == 0,
        f"train.batch_size={t.batch_size} (micro-batch {micro}) is not divisible by "
        f"mesh data x fsdp x expert = {data_parallel} data-parallel devices",
    )
    _require(
        t.batch_size % n_processes == 0,
        f"train.batch_size={t.batch_size} is not divisible by the {n_processes} processes",
    )
    try:
        BatchLayout(d.num_logical_shards, t.batch_size, n_processes)
    except ValueError as e:
        raise ConfigError(f"config data/train: {e}") from None


def build(cls: type, values: Any, path: str = "") -> Any:
    """An instance of dataclass `cls` from a nested dict, naming the first unknown key with a suggestion."""
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ConfigError(f"config {path.rstrip('.') or 'root'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {path}{near[0]}?)" if near else ""
            raise ConfigError(f"unknown config key {path}{key}{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _build_value(hints[key], value, f"{path}{key}") for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config {path.rstrip('.') or 'root'}: {e}") from None


def _build_value(hint: Any, value: Any, path: str) -> Any:
    """value converted to the field type `hint`: nested dataclasses, tuples, mixture dicts, numbers."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path + ".")
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config {path} must be a list, got {value!r}")
        return tuple(value)
    if origin is dict:
        item = typing.get_args(hint)[1]
        return {k: build(item, v, f"{path}.{k}.") for k, v in dict(value).items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        hint in (int, float, str, bool)
        and not isinstance(value, hint)
        or (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"config {path} must be {hint.__name__}, got {value!r}")
    return value


def to_dict(value: Any) -> Any:
    """A dataclass tree as plain dicts and lists (JSON-able)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict | types.MappingProxyType):
        return {k: to_dict(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [to_dict(v) for v in value]
    return value


def model_from_dict(values: dict) -> ModelConfig:
    """A ModelConfig from a (possibly older) saved dict: fields added since it was written take defaults."""
    return build(ModelConfig, values, "model.")


__all__ = ["Config", "ConfigError", "DataConfig", "MixtureComponent", "ModelConfig", "SparseSettings"]
