"""Checks a training config against the devices before anything is compiled, with messages naming keys."""

import ml_collections

from data_pipelines.batch_layout import BatchLayout
from mct.attention import sparse_config
from mct.schedule import DECAY_SHAPES
from mct.sharding import ConfigError, mesh_shape
from pallas_kernels import infllm_v2

ATTENTION_IMPLEMENTATIONS = ("blockwise", "naive", "infllm_v2")


def validate_config(config: ml_collections.ConfigDict, n_devices: int, n_processes: int = 1) -> None:
    """Raises ConfigError for a config that cannot run on `n_devices` devices in `n_processes` processes."""
    m, t, d = config.model, config.train, config.data
    if not config.workdir:
        raise ConfigError("config workdir is empty: pass --config.workdir=DIR")
    data, fsdp, tensor = mesh_shape(config.mesh, n_devices)
    for key in ("n_heads", "n_kv_heads", "d_mlp", "vocab_size"):
        if m[key] % tensor:
            raise ConfigError(f"config model.{key}={m[key]} is not divisible by mesh.tensor={tensor}")
    if m.d_model % fsdp:
        raise ConfigError(f"config model.d_model={m.d_model} is not divisible by mesh.fsdp={fsdp}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"config model.n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}")
    if m.head_dim % 2:
        raise ConfigError(f"config model.head_dim={m.head_dim} must be even for RoPE")
    if m.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"config model.attention={m.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if m.attention == "infllm_v2":
        try:
            sparse_config(m)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config model.sparse: {e}") from None
        if m.sparse.use_nope:
            raise ConfigError(
                "config model.sparse.use_nope=True is not supported: the model selects blocks from q, k after "
                "RoPE (MiniCPM4's setting)"
            )
        if m.sparse.implementation not in infllm_v2.IMPLEMENTATIONS:
            raise ConfigError(
                f"config model.sparse.implementation={m.sparse.implementation!r} is not one of "
                f"{infllm_v2.IMPLEMENTATIONS}"
            )
    if m.parametrization not in ("mup", "sp"):
        raise ConfigError(f"config model.parametrization={m.parametrization!r} must be 'mup' or 'sp'")
    if 0 < m.loss_chunk < d.seq_len and d.seq_len % m.loss_chunk:
        raise ConfigError(f"config model.loss_chunk={m.loss_chunk} does not divide data.seq_len={d.seq_len}")
    dp = data * fsdp
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"config train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if (t.batch_size // t.grad_accum) % dp:
        raise ConfigError(
            f"config train.batch_size={t.batch_size} (micro-batch {t.batch_size // t.grad_accum}) is not divisible "
            f"by mesh data x fsdp = {data} x {fsdp}"
        )
    if t.batch_size % n_processes:
        raise ConfigError(
            f"config train.batch_size={t.batch_size} is not divisible by the {n_processes} processes"
        )
    try:
        BatchLayout(d.num_logical_shards, t.batch_size, n_processes)
    except ValueError as e:
        raise ConfigError(f"config data/train: {e}") from None
    s = config.schedule
    if s.decay_shape not in DECAY_SHAPES:
        raise ConfigError(f"config schedule.decay_shape={s.decay_shape!r} is not one of {DECAY_SHAPES}")
    if s.branch_from and s.branch_step < 0:
        raise ConfigError("config schedule.branch_from is set but schedule.branch_step is not")
    if not s.branch_from and s.warmup_steps + s.decay_steps > t.steps:
        raise ConfigError(
            f"config schedule.warmup_steps + decay_steps = {s.warmup_steps + s.decay_steps} exceeds "
            f"train.steps={t.steps}"
        )
