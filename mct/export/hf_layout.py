"""The Hugging Face checkpoint layouts that export writes and import reads: tensor names, [out, in]
orientation, config.json fields, and the muP scales that the Llama layout folds into the weights.

`minicpm`: MiniCPM's own names and OpenBMB's release config (`openbmb`: scale_emb, scale_depth,
dim_model_base, LongRoPE rope_scaling, sparse_config, auto_map), computed exactly like mct.model. `llama`: stock
Llama; embedding x scale_emb, o_proj and down_proj x scale_depth/sqrt(L), lm_head x 1/m (m =
d_model/dim_model_base), untied unless the embedding and head scales coincide. Both layouts list every tensor with
the parameter (and layer) it comes from, so export and import are one table read in two directions. Import
refuses, by name, every config.json field mct would not compute exactly as written.
"""

import dataclasses
import math

import numpy as np

from mct.config.model import ROPE_TYPES, ModelConfig
from mct.errors import ConfigError
from mct.export import openbmb
from mct.model.decoder import width_multiplier
from mct.model.rope import longrope_attention_factor, yarn_attention_factor

LAYOUTS = ("minicpm", "llama")
ARCHITECTURES = {"minicpm": openbmb.ARCHITECTURE, "llama": "LlamaForCausalLM"}
# What config.json carries for import to undo the Llama layout's folding (ignored by Llama loaders).
MUP_RECORD = "mct_folded_mup"
# The rope settings (besides rope_type, type, rope_theta) that transformers' computation of each rope type
# reads (modeling_rope_utils); import refuses any other, which mct would silently ignore.
_ROPE_SETTINGS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": (
        "short_factor",
        "long_factor",
        "original_max_position_embeddings",
        "factor",
        "attention_factor",
    ),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    ),
}
# config.json fields that describe the files or the HF runtime, not the computation.
_METADATA_FIELDS = frozenset(
    {
        "architectures",
        "auto_map",
        "model_type",
        "_name_or_path",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)
# Fields mct computes at one value only (a bias, dropout, split matmuls, an Eagle head's muP): others are refused.
_FIXED_FIELDS = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "attention_dropout": 0.0,
    "pretraining_tp": 1,
    "mup_denominator": None,
}
# Fields model_fields reads, in every layout and in one.
_READ_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "original_max_position_embeddings",
        "tie_word_embeddings",
        "quantization_config",
    }
)
_LAYOUT_FIELDS = {
    "minicpm": {"scale_emb", "scale_depth", "dim_model_base", "sparse_config"},
    "llama": {MUP_RECORD},
}
_UNFOLD_SEARCH_ULPS = 3  # how far from the interval's middle unfold looks for an exact preimage


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor: hf = orient(params[param][layer]) * scale, shape `shape`."""

    name: str
    param: str
    layer: int | None
    scale: float
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class FoldedScales:
    """The multipliers the Llama layout folds in (all 1 for the MiniCPM layout)."""

    embed: float
    branch: float
    head: float

    @classmethod
    def of(cls, cfg: ModelConfig, layout: str) -> "FoldedScales":
        if layout == "minicpm" and not cfg.moe.num_experts:  # MoE: Mixtral, folded like Llama
            return cls(1.0, 1.0, 1.0)
        return cls(cfg.scale_emb, cfg.scale_depth / math.sqrt(cfg.n_layers), 1.0 / width_multiplier(cfg))


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def ties_head(cfg: ModelConfig, layout: str) -> bool:
    """Whether the HF checkpoint ties lm_head to the embedding (Llama: only if both fold the same scale)."""
    scales = FoldedScales.of(cfg, layout)
    return cfg.tie_embeddings and np.float32(scales.embed) == np.float32(scales.head)


def check_moe(cfg: ModelConfig, layout: str) -> None:
    """An MoE model has no Llama layout: its export is the minicpm format, written as Mixtral."""
    if cfg.moe.num_experts and layout != "minicpm":
        raise ValueError(
            f"the {layout} layout has no experts: this is an MoE model (model.moe.num_experts="
            f"{cfg.moe.num_experts}); export it with --format minicpm (MixtralForCausalLM)"
        )


def _moe_specs(cfg: ModelConfig, i: int, branch: float) -> list[TensorSpec]:
    """Layer i's router and experts in the Mixtral layout (block_sparse_moe: gate; experts.E.w1/w3/w2)."""
    d, f, prefix = cfg.d_model, cfg.d_mlp, f"model.layers.{i}.block_sparse_moe."
    specs = [TensorSpec(prefix + "gate.weight", "router", i, 1.0, (cfg.moe.num_experts, d))]
    for e in range(cfg.moe.num_experts):
        specs += [
            TensorSpec(f"{prefix}experts.{e}.w1.weight", "w_gate", (i, e), 1.0, (f, d)),
            TensorSpec(f"{prefix}experts.{e}.w3.weight", "w_up", (i, e), 1.0, (f, d)),
            TensorSpec(f"{prefix}experts.{e}.w2.weight", "w_down", (i, e), branch, (d, f)),
        ]
    return specs


def _mtp_specs(cfg: ModelConfig, s: "FoldedScales") -> list[TensorSpec]:
    """The MTP blocks (DeepSeek-V3's names under model.mtp.K.: enorm, hnorm, eh_proj [d, 2d], a decoder
    layer, final_layernorm), for self-speculative decoding; the head and embedding are the model's. eh_proj
    reads [RMSNorm(h); RMSNorm(Emb(x))], mct's order (DeepSeek-V3 puts the embedding first)."""
    d, specs = cfg.d_model, []
    for k in range(cfg.mtp.depth):
        p = f"model.mtp.{k}."
        specs += [
            TensorSpec(p + "hnorm.weight", "mtp_h_norm", k, 1.0, (d,)),
            TensorSpec(p + "enorm.weight", "mtp_e_norm", k, 1.0, (d,)),
            TensorSpec(p + "eh_proj.weight", "mtp_proj", k, 1.0, (d, 2 * d)),
            *_block_specs(cfg, p, "mtp_", k, s.branch, dense=True),
            TensorSpec(p + "final_layernorm.weight", "mtp_out_norm", k, 1.0, (d,)),
        ]
    return specs


def _block_specs(
    cfg: ModelConfig, prefix: str, param_prefix: str, i: int, branch: float, dense: bool
) -> list[TensorSpec]:
    """Decoder block i's tensors (HF names under `prefix`, params `param_prefix` + LAYER_WEIGHTS' names);
    a dense MLP, or the Mixtral experts of an MoE layer."""
    d, f = cfg.d_model, cfg.d_mlp
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    p = param_prefix
    specs = [
        TensorSpec(prefix + "input_layernorm.weight", p + "attn_norm", i, 1.0, (d,)),
        TensorSpec(prefix + "self_attn.q_proj.weight", p + "wq", i, 1.0, (q, d)),
        TensorSpec(prefix + "self_attn.k_proj.weight", p + "wk", i, 1.0, (kv, d)),
        TensorSpec(prefix + "self_attn.v_proj.weight", p + "wv", i, 1.0, (kv, d)),
        TensorSpec(prefix + "self_attn.o_proj.weight", p + "wo", i, branch, (d, q)),
        TensorSpec(prefix + "post_attention_layernorm.weight", p + "mlp_norm", i, 1.0, (d,)),
    ]
    if not dense:
        return specs + _moe_specs(cfg, i, branch)
    return specs + [
        TensorSpec(prefix + "mlp.gate_proj.weight", p + "w_gate", i, 1.0, (f, d)),
        TensorSpec(prefix + "mlp.up_proj.weight", p + "w_up", i, 1.0, (f, d)),
        TensorSpec(prefix + "mlp.down_proj.weight", p + "w_down", i, branch, (d, f)),
    ]


def tensor_plan(cfg: ModelConfig, layout: str, keep_mtp: bool = False) -> list[TensorSpec]:
    """Every tensor of the HF checkpoint, in a fixed order, with its source parameter. MoE models (minicpm
    layout only) write Mixtral's tensors; the MTP blocks are left out unless keep_mtp."""
    check_layout(layout)
    check_moe(cfg, layout)
    s = FoldedScales.of(cfg, layout)
    d, V = cfg.d_model, cfg.vocab_size
    plan = [TensorSpec("model.embed_tokens.weight", "embed", None, s.embed, (V, d))]
    for i in range(cfg.n_layers):
        plan += _block_specs(cfg, f"model.layers.{i}.", "", i, s.branch, dense=not cfg.moe.num_experts)
    if keep_mtp:
        plan += _mtp_specs(cfg, s)
    plan.append(TensorSpec("model.norm.weight", "final_norm", None, 1.0, (d,)))
    if not cfg.tie_embeddings:
        plan.append(TensorSpec("lm_head.weight", "lm_head", None, s.head, (V, d)))
    elif not ties_head(cfg, layout):  # the embedding, read again with the head's scale
        plan.append(TensorSpec("lm_head.weight", "embed", None, s.head, (V, d)))
    return plan


def to_hf(spec: TensorSpec, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The HF tensor from the mct parameter (one layer of a stacked one), scaled in fp32, cast to dtype."""
    value = np.asarray(value, np.float32)
    param = spec.param.removeprefix("mtp_")
    if param in ("wq", "wk", "wv"):  # [d, heads, head_dim] -> [heads * head_dim, d]
        value = value.reshape(value.shape[0], -1).T
    elif param == "wo":  # [heads, head_dim, d] -> [d, heads * head_dim]
        value = value.reshape(-1, value.shape[-1]).T
    elif param in ("w_gate", "w_up", "w_down", "lm_head", "router", "proj"):  # [in, out] -> [out, in]
        value = value.T
    if spec.scale != 1.0:
        value = value * np.float32(spec.scale)
    return np.ascontiguousarray(value.astype(dtype))


def from_hf(spec: TensorSpec, tensor: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
    """The inverse orientation of to_hf (no unscaling): HF tensor -> mct layout of shape param_shape."""
    if spec.param in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"):
        tensor = tensor.T
    return np.asarray(tensor).reshape(param_shape)


def unfold(folded: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """fp32 weights x with (x * scale).astype(y.dtype) == y for every (y, scale > 0) given, where x exists.

    y / scale of one constraint often breaks another (a tied embedding exported as both embed_tokens and
    lm_head, or bf16 rounding), which would break export -> import -> export bit-identity. So: intersect each
    y's rounding interval mapped back through its scale, start from the middle, and try the nearest floats
    in turn. Elements with no preimage (weights folded elsewhere) keep that middle.
    """
    low, high = -np.inf, np.inf
    for y, scale in folded:
        y64 = y.astype(np.float64)
        below = np.nextafter(y, np.array(-np.inf, y.dtype)).astype(np.float64)
        above = np.nextafter(y, np.array(np.inf, y.dtype)).astype(np.float64)
        low = np.maximum(low, (y64 + below) / 2 / scale)
        high = np.minimum(high, (y64 + above) / 2 / scale)
    middle = ((low + high) / 2).astype(np.float32)
    result, found = middle.copy(), np.zeros(middle.shape, bool)
    up = down = middle
    candidates = [middle]
    for _ in range(_UNFOLD_SEARCH_ULPS + 1):
        for candidate in candidates:
            ok = ~found
            for y, scale in folded:
                ok &= (candidate * np.float32(scale)).astype(y.dtype) == y
            result = np.where(ok, candidate, result)
            found |= ok
        if found.all():
            break
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        candidates = [up, down]
    return result


def _rope_fields(cfg: ModelConfig) -> dict:
    """config.json's rope_theta and rope_scaling: the layout transformers 4 and 5 and MiniCPM's code read."""
    rope = cfg.rope
    if rope.type == "default":
        return {"rope_theta": rope.theta, "rope_scaling": None}
    scaling = {"rope_type": rope.type}
    if rope.type in ("linear", "llama3", "yarn"):
        scaling["factor"] = rope.factor
    if rope.type in ("llama3", "longrope", "yarn"):
        scaling["original_max_position_embeddings"] = rope.original_max_position
    if rope.type == "llama3":
        scaling.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.type == "yarn":
        scaling.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
    if rope.type == "longrope":
        ones = [1.0] * (cfg.head_dim // 2)
        scaling.update(
            short_factor=list(rope.short_factor) or ones, long_factor=list(rope.long_factor) or ones
        )
    if rope.type in ("longrope", "yarn") and rope.attention_factor:  # else derived, in transformers as in mct
        scaling["attention_factor"] = rope.attention_factor
    return {"rope_theta": rope.theta, "rope_scaling": scaling}


def hf_config(cfg: ModelConfig, layout: str, special_ids: dict[str, int], dtype: str) -> dict:
    """config.json for the layout. special_ids: the tokenizer's bos/eos/pad ids ("<s>", "</s>", "<pad>"); the
    minicpm layout is OpenBMB's release format (no model_type: auto_map names the classes; sparse_config in
    OpenBMB's convention, null when dense)."""
    check_layout(layout)
    config = {
        "architectures": [ARCHITECTURES[layout]],
        "model_type": layout,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position,
        "rms_norm_eps": cfg.rms_eps,
        **_rope_fields(cfg),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": bool(ties_head(cfg, layout)),
        "bos_token_id": special_ids.get("<s>"),
        "eos_token_id": special_ids.get("</s>"),
        "pad_token_id": special_ids.get("<pad>"),
        "torch_dtype": dtype,
    }
    mup = {
        "scale_emb": cfg.scale_emb,
        "scale_depth": cfg.scale_depth,
        "dim_model_base": round(cfg.d_model / width_multiplier(cfg)),
    }
    if cfg.moe.num_experts:  # MiniCPM-MoE as Mixtral (muP folded, like the Llama layout)
        config.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            sliding_window=None,
            num_local_experts=cfg.moe.num_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=cfg.moe.aux_loss_weight,
            output_router_logits=False,
        )
        config[MUP_RECORD] = {**mup, "tie_embeddings": cfg.tie_embeddings}
    elif layout == "minicpm":
        del config["model_type"]
        sparse = openbmb.sparse_to_release(cfg.sparse) if cfg.attention == "infllm_v2" else None
        config.update(mup, auto_map=openbmb.AUTO_MAP, sparse_config=sparse)
    else:
        config[MUP_RECORD] = {**mup, "tie_embeddings": cfg.tie_embeddings}
    return config


def check_dense_export(cfg: ModelConfig, target: str, allow_dense: bool) -> None:
    """A format without sparse attention (`target`: "llama", "gguf") would run an InfLLM v2 model densely, a
    different model past sparse.dense_len tokens: refused unless allow_dense."""
    if cfg.attention == "infllm_v2" and not allow_dense:
        raise ConfigError(
            f"the {target} format has no InfLLM v2 sparse attention (model.attention='infllm_v2'): it would run "
            "this model densely; pass --allow_dense to export it anyway, or export --format minicpm"
        )


def layout_of(hf: dict, path: str) -> str:
    """Which layout a config.json describes ("minicpm" or "llama"); OpenBMB's releases have no model_type,
    only architectures ["MiniCPMForCausalLM"] (and auto_map)."""
    model_type = hf.get("model_type")
    if model_type is None and hf.get("architectures") == [openbmb.ARCHITECTURE]:
        return "minicpm"
    if model_type not in LAYOUTS:
        raise ValueError(f"{path}: model_type {model_type!r} is not one of {LAYOUTS}")
    return model_type


def check_fields(hf: dict, path: str, layout: str) -> None:
    """Refuses, by name, every config.json field mct would not compute exactly: unknown ones (mct would
    ignore them) and known ones at a value other than the one mct computes."""
    known = _METADATA_FIELDS | _READ_FIELDS | _FIXED_FIELDS.keys() | _LAYOUT_FIELDS[layout]
    unknown = sorted(set(hf) - known)
    if unknown:
        raise ValueError(
            f"{path}: config field {unknown[0]!r} is not supported (mct would ignore it and compute another model)"
        )
    for key, value in _FIXED_FIELDS.items():
        if hf.get(key, value) != value:
            raise ValueError(
                f"{path}: config field {key!r}={hf[key]!r} is not supported (mct computes {value!r})"
            )


def _field(source: dict, key: str, path: str, where: str = ""):
    """source[key]; the error names config.json and the field (`where`: the dict it sits in, "a.")."""
    if key not in source:
        raise ValueError(f"{path}: config lacks the field {where}{key!r}")
    return source[key]


def _rope_from_hf(hf: dict, path: str, head_dim: int, max_position: int) -> dict:
    """RopeConfig fields of a config.json, read as transformers 5 reads them (PreTrainedConfig's
    convert_rope_params_to_dict and standardize_rope_params): the settings are `rope_scaling` (the old layout;
    it wins when both are set) or `rope_parameters` (the new one), rope_theta sits in them or at the top level
    (default 10000), and a top-level original_max_position_embeddings (Phi-3's layout) overrides theirs.
    Other rope types, and settings mct would not compute, are refused: importing them would change the model."""
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    settings = hf.get(where) or {}
    rope_type = settings.get("rope_type", settings.get("type", "default"))
    if rope_type not in _ROPE_SETTINGS:
        raise ValueError(f"{path}: {where} rope_type {rope_type!r} is not supported (one of {ROPE_TYPES})")
    known = _ROPE_SETTINGS[rope_type]
    unknown = sorted(set(settings) - {"rope_type", "type", "rope_theta", *known})
    if unknown:
        raise ValueError(
            f"{path}: {where}.{unknown[0]} is not supported with rope_type {rope_type!r} "
            f"(mct reads {', '.join(('rope_theta', *known))})"
        )

    def need(key):
        return _field(settings, key, path, f"{where}.")

    rope = {"theta": float(settings.get("rope_theta", hf.get("rope_theta", 10000.0))), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        rope["factor"] = float(need("factor"))
    if rope_type == "llama3":
        rope["low_freq_factor"] = float(need("low_freq_factor"))
        rope["high_freq_factor"] = float(need("high_freq_factor"))
    if rope_type in ("llama3", "longrope", "yarn"):
        key = "original_max_position_embeddings"
        rope["original_max_position"] = int(hf.get(key) or settings.get(key) or max_position)
    if rope_type == "yarn":
        rope.update(_yarn_from_hf(settings, path, where, max_position / rope["original_max_position"]))
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            rope[key] = tuple(float(f) for f in need(key))
            if len(rope[key]) != head_dim // 2:
                raise ValueError(
                    f"{path}: {where}.{key} has {len(rope[key])} entries, not head_dim/2 = {head_dim // 2}"
                )
        # transformers' cos/sin magnitude: attention_factor, else derived from factor, else from the lengths
        if settings.get("attention_factor") is not None:
            rope["attention_factor"] = float(settings["attention_factor"])
            if rope["attention_factor"] <= 0:
                raise ValueError(f"{path}: {where}.attention_factor must be positive")
        elif settings.get("factor") is not None:
            rope["attention_factor"] = longrope_attention_factor(
                settings["factor"], rope["original_max_position"]
            )
    return rope


def _yarn_from_hf(settings: dict, path: str, where: str, length_ratio: float) -> dict:
    """YaRN's RopeConfig fields as transformers reads them (_compute_yarn_parameters): factor (null: the
    length ratio), beta_fast / beta_slow (null or 0: 32 / 1), truncate; the cos/sin magnitude given, else
    from mscale / mscale_all_dim when both are set, else from factor."""
    factor = float(settings.get("factor") or length_ratio)
    attention = settings.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = settings.get("mscale"), settings.get("mscale_all_dim")
        attention = (
            yarn_attention_factor(factor, mscale, mscale_all_dim) if mscale and mscale_all_dim else None
        )
    if attention is not None and attention <= 0:
        raise ValueError(f"{path}: {where}.attention_factor must be positive")
    return {
        "factor": factor,
        "beta_fast": float(settings.get("beta_fast") or 32.0),
        "beta_slow": float(settings.get("beta_slow") or 1.0),
        "truncate": bool(settings.get("truncate", True)),
        "attention_factor": float(attention or 0.0),  # 0: from factor, as transformers derives it
    }


def model_fields(hf: dict, path: str, unfold_mup: bool) -> dict:
    """mct model config fields from a config.json. A Llama layout reads as scale-free (scale_emb 1, branch
    scale 1, m 1) unless unfold_mup, which restores the muP scales recorded at export."""

    def need(key, source=hf, where=""):
        return _field(source, key, path, where)

    def count(key: str, default: int | None = None) -> int:
        """A shape field (layers, widths, heads): a positive integer; `default` if missing or null."""
        value = hf.get(key)
        if value is None:
            value = need(key) if default is None else default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: config field {key!r} must be a positive integer, got {value!r}")
        return value

    layout = layout_of(hf, path)
    if layout == "minicpm":  # what OpenBMB's MiniCPMConfig reads for a field the file leaves out
        hf = {**openbmb.CONFIG_DEFAULTS, **hf}
    check_fields(hf, path, layout)
    n_layers, d_model = count("num_hidden_layers"), count("hidden_size")
    n_heads = count("num_attention_heads")
    fields = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=count("num_key_value_heads", n_heads),
        head_dim=count("head_dim", d_model // n_heads),
        d_mlp=count("intermediate_size"),
        vocab_size=count("vocab_size"),
        rms_eps=need("rms_norm_eps"),
        max_position=count("max_position_embeddings"),
        parametrization="mup",
    )
    fields["rope"] = _rope_from_hf(hf, path, fields["head_dim"], fields["max_position"])
    tied = bool(hf.get("tie_word_embeddings", False))
    if layout == "minicpm":
        mup = {k: need(k) for k in ("scale_emb", "scale_depth", "dim_model_base")}
        fields.update(openbmb.sparse_from_release(hf.get("sparse_config"), path))
    elif unfold_mup:
        record = need(MUP_RECORD)
        mup = {k: need(k, record, f"{MUP_RECORD}.") for k in ("scale_emb", "scale_depth", "dim_model_base")}
        tied = bool(need("tie_embeddings", record, f"{MUP_RECORD}."))
    else:
        mup = {"scale_emb": 1.0, "scale_depth": math.sqrt(n_layers), "dim_model_base": d_model}
    fields.update(mup, tie_embeddings=tied)
    return fields
