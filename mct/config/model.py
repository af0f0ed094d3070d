"""The model's config: the MiniCPM decoder's shape and options (muP, RoPE, attention, MTP, MoE, FP8, BitCPM).

Frozen and hashable: it keys jit caches and decoding's compiled steps. It imports neither data nor kernel code
(the InfLLM v2 settings are the kernels' plain settings record).
"""

import dataclasses

from mct.config.schema import build, require
from pallas_kernels.infllm_v2.config import IMPLEMENTATIONS as SPARSE_IMPLEMENTATIONS
from pallas_kernels.infllm_v2.config import SparseConfig

ATTENTION_IMPLEMENTATIONS = ("auto", "blockwise", "naive", "splash", "flash_gpu", "infllm_v2")
ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
REMAT_NAMES = (
    "none",
    "full",
    "minimal",
    "save_qkv_proj",
    "save_attn_out",
    "save_dot_except_mlp",
    "offload_residual",
    "save_residual",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
)
QUANT_WEIGHTS = ("none", "ternary")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE: `default`; `linear` (positions / factor); `llama3` (wavelength-banded factors); `longrope`
    (per-frequency factors, the short list up to original_max_position; cos/sin scaled by attention_factor,
    0 = sqrt(1 + ln(max/orig) / ln(orig))); `yarn` (frequencies / factor below the beta_slow .. beta_fast
    rotation band of original_max_position, kept above it, blended within; attention_factor 0 =
    0.1 ln(factor) + 1)."""

    theta: float = 10000.0
    type: str = "default"
    original_max_position: int = 32768
    short_factor: tuple[float, ...] = ()  # longrope: one factor per frequency (head_dim // 2); () = all 1
    long_factor: tuple[float, ...] = ()
    factor: float = 1.0  # linear, llama3, yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    attention_factor: float = 0.0  # longrope, yarn: cos/sin magnitude (0 = derived)
    beta_fast: float = 32.0  # yarn: rotations over original_max_position above which frequencies are kept
    beta_slow: float = 1.0  # yarn: rotations below which frequencies are divided by factor
    truncate: bool = True  # yarn: round the blend band outward to whole dimensions


@dataclasses.dataclass(frozen=True)
class SparseSettings(SparseConfig):
    """InfLLM v2 settings (MiniCPM4 report section 2.1) plus which kernel implementation runs them."""

    implementation: str = "xla"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """BitCPM weight quantisation in the forward pass (mct/model/quant.py): "none", or "ternary" ({-1, 0, 1} x a
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
    # Attention dispatch (mct/model/attention.py): "auto" (splash on TPU, the Pallas flash kernel on GPU, blockwise
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
    # the step's micro-batch and loss-chunk loops unrolled (layers too when scan_layers is off): XLA's cost
    # analysis counts a loop body once, an unrolled one fully (mct.aot's step-time estimate); not for training
    unroll_loops: bool = False
    mtp: MTPConfig = MTPConfig()
    moe: MoEConfig = MoEConfig()
    fp8: bool = False  # linear layers in float8_e4m3fn with block scales (mct/model/fp8.py); attention, head stay bf16
    quant: QuantConfig = QuantConfig()


def check_sharding(m: ModelConfig, tensor: int, fsdp: int, expert: int = 1) -> None:
    """The model's fit to the tensor, fsdp and expert mesh axes it is sharded over."""
    require(
        m.moe.num_experts % expert == 0,
        f"model.moe.num_experts={m.moe.num_experts} is not divisible by mesh.expert={expert}",
    )
    for key in ("n_heads", "n_kv_heads", "d_mlp", "vocab_size"):
        require(
            getattr(m, key) % tensor == 0,
            f"model.{key}={getattr(m, key)} is not divisible by mesh.tensor={tensor}",
        )
    require(m.d_model % fsdp == 0, f"model.d_model={m.d_model} is not divisible by mesh.fsdp={fsdp}")


def check_model(m: ModelConfig) -> None:
    """The model's own constraints."""
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "vocab_size"):
        require(getattr(m, key) > 0, f"model.{key}={getattr(m, key)} must be positive")
    require(
        m.n_heads % m.n_kv_heads == 0,
        f"model.n_heads={m.n_heads} is not a multiple of n_kv_heads={m.n_kv_heads}",
    )
    require(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for RoPE")
    require(
        m.attention in ATTENTION_IMPLEMENTATIONS,
        f"model.attention={m.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}",
    )
    require(
        m.dense_attention in ATTENTION_IMPLEMENTATIONS and m.dense_attention != "infllm_v2",
        f"model.dense_attention={m.dense_attention!r} is not a dense one of {ATTENTION_IMPLEMENTATIONS}",
    )
    require(
        m.parametrization in ("mup", "sp"),
        f"model.parametrization={m.parametrization!r} must be 'mup' or 'sp'",
    )
    require(m.remat in REMAT_NAMES, f"model.remat={m.remat!r} is not one of {REMAT_NAMES}")
    require(m.rope.type in ROPE_TYPES, f"model.rope.type={m.rope.type!r} is not one of {ROPE_TYPES}")
    require(m.max_position > 0, f"model.max_position={m.max_position} must be positive")
    check_scales(m)
    check_quant(m)
    require(m.mtp.depth >= 0 and m.mtp.loss_weight >= 0, f"model.mtp {m.mtp} needs depth, loss_weight >= 0")
    require(m.moe.num_experts >= 0, f"model.moe.num_experts={m.moe.num_experts} must be >= 0 (0 = dense)")
    if m.moe.num_experts:
        require(
            0 < m.moe.top_k <= m.moe.num_experts and m.moe.capacity_factor >= 0,
            f"model.moe.top_k={m.moe.top_k} must be in [1, num_experts={m.moe.num_experts}] and "
            f"model.moe.capacity_factor={m.moe.capacity_factor} >= 0",
        )
        require(
            m.moe.aux_loss_weight >= 0 and m.moe.z_loss_weight >= 0,
            f"model.moe.aux_loss_weight={m.moe.aux_loss_weight} and model.moe.z_loss_weight="
            f"{m.moe.z_loss_weight} must be >= 0 (a negative one rewards the imbalance it should penalise)",
        )
    if m.attention == "infllm_v2":
        require(
            not m.sparse.use_nope,
            "model.sparse.use_nope=True is not supported: the model selects blocks "
            "from q, k after RoPE (MiniCPM4's setting)",
        )
        require(
            m.sparse.implementation in SPARSE_IMPLEMENTATIONS,
            f"model.sparse.implementation={m.sparse.implementation!r} is not one of {SPARSE_IMPLEMENTATIONS}",
        )


def check_scales(m: ModelConfig) -> None:
    """The positive scales and divisors of the forward pass and the init: 0 zeroes a term or divides by zero,
    a negative one flips a sign or NaNs a square root."""
    scales = {
        "rms_eps": m.rms_eps,
        "scale_emb": m.scale_emb,
        "scale_depth": m.scale_depth,
        "dim_model_base": m.dim_model_base,
        "init_std": m.init_std,
        "attention_block": m.attention_block,
        "rope.theta": m.rope.theta,
        "rope.factor": m.rope.factor,
    }
    for key, value in scales.items():
        require(value > 0, f"model.{key}={value} must be positive")


def check_quant(m: ModelConfig) -> None:
    """model.quant: a known scheme whose group size divides every quantised matrix's input dimension."""
    q = m.quant
    require(q.weights in QUANT_WEIGHTS, f"model.quant.weights={q.weights!r} is not one of {QUANT_WEIGHTS}")
    if q.weights == "none":
        return
    require(q.group_size > 0, f"model.quant.group_size={q.group_size} must be positive")
    inputs = {"d_model": m.d_model, "n_heads * head_dim": m.n_heads * m.head_dim, "d_mlp": m.d_mlp}
    for name, size in inputs.items():
        require(
            size % q.group_size == 0,
            f"model.quant.group_size={q.group_size} does not divide the input dimension model.{name}={size}",
        )


def model_from_dict(values: dict) -> ModelConfig:
    """A ModelConfig from a (possibly older) saved dict: fields added since it was written take defaults."""
    return build(ModelConfig, values, "model.")
