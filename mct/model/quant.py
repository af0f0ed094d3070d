"""BitCPM ternary weights (MiniCPM4 report, BitCPM4; BitCPM-CANN report): group quantiser, STE, 2-bit packing.

Per group of `group_size` consecutive weights along a matrix's input (contraction) dimension:
s = max(mean|W_g|, EPS), Wq = clamp(round(W / s), -1, 1) * s. round is round-half-to-even (jnp.round, as
torch.round and np.round), so a weight at exactly +-0.5 s becomes 0 and one at +-1.5 s becomes +-1 (clamped).
Training sees Wq through a straight-through estimator (value Wq, gradient the identity's), while the
optimizer keeps the fp32 latent weights; embeddings, norms and the LM head stay high precision.

The quantised parameters and their contraction axes (mct's layout stores every matrix [in..., out...],
with a leading [layers] axis when stacked):
  wq, wk, wv  [L, d, heads, head_dim]   contraction over d
  wo          [L, heads, head_dim, d]   contraction over heads * head_dim (flattened, heads major)
  w_gate/w_up [L, d, d_mlp]             contraction over d
  w_down      [L, d_mlp, d]             contraction over d_mlp
The functions below take any array and the contraction `axis` (-2 for mct's [..., in, out] matrix view of
`as_matrix`; -1 for HF's [out, in] tensors).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import ModelConfig, QuantConfig

EPS = 1e-5  # smallest group scale: an all-zero group quantises to zeros, not NaN
# parameter -> (number of contraction dims, number of output dims) at the end of its shape
MATRIX_DIMS = {
    "wq": (1, 2),
    "wk": (1, 2),
    "wv": (1, 2),
    "wo": (2, 1),
    "w_gate": (1, 1),
    "w_up": (1, 1),
    "w_down": (1, 1),
}
QUANTISED = tuple(MATRIX_DIMS)


def as_matrix(name: str, w: jnp.ndarray) -> jnp.ndarray:
    """Parameter `name` ([layers]? + its own dims) viewed as [..., in, out] (a reshape)."""
    n_in, n_out = MATRIX_DIMS[name]
    lead = w.shape[: w.ndim - n_in - n_out]
    return w.reshape(*lead, int(np.prod(w.shape[len(lead) : len(lead) + n_in])), -1)


def _grouped(w: jnp.ndarray, group_size: int, axis: int) -> jnp.ndarray:
    """w with `axis` moved last and split into groups: [..., n_groups, group_size]."""
    w = jnp.moveaxis(w, axis, -1)
    if w.shape[-1] % group_size:
        raise ValueError(f"group size {group_size} does not divide the contraction dimension {w.shape[-1]}")
    return w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def _ungrouped(g: jnp.ndarray, axis: int) -> jnp.ndarray:
    """The inverse of _grouped: [..., n_groups, group_size] -> the original layout."""
    return jnp.moveaxis(g.reshape(*g.shape[:-2], -1), -1, axis)


def _group_mean(x: jnp.ndarray) -> jnp.ndarray:
    """The mean over the last axis, [..., n] -> [..., 1], summed as a fixed pairwise tree of elementwise adds.

    A reduction's order is XLA's choice (it differs between one jitted stacked array and one eager layer),
    so the scales, and the weights, would differ in the last bit between training and export; elementwise
    adds are computed as written everywhere.
    """
    n = x.shape[-1]
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:  # adding a zero is exact
            x = jnp.concatenate([x, jnp.zeros_like(x[..., :1])], axis=-1)
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x / n


def ternary_codes(w: jnp.ndarray, group_size: int, axis: int = -2) -> tuple[jnp.ndarray, jnp.ndarray]:
    """codes (int8 in {-1, 0, 1}, w's shape) and fp32 scales (w's shape with `axis` divided by group_size)."""
    g = _grouped(jnp.asarray(w, jnp.float32), group_size, axis)  # [..., n_groups, group_size]
    scale = jnp.maximum(_group_mean(jnp.abs(g)), EPS)  # [..., n_groups, 1]
    codes = jnp.clip(jnp.round(g / scale), -1, 1).astype(jnp.int8)
    return _ungrouped(codes, axis), jnp.moveaxis(scale[..., 0], -1, axis)


def ternary_dequantize(
    codes: jnp.ndarray, scales: jnp.ndarray, group_size: int, axis: int = -2
) -> jnp.ndarray:
    """codes * s in fp32, each scale repeated over its group: the weights the quantised forward uses."""
    g = _grouped(jnp.asarray(codes, jnp.float32), group_size, axis)
    return _ungrouped(g * jnp.moveaxis(jnp.asarray(scales, jnp.float32), axis, -1)[..., None], axis)


def ternary(w: jnp.ndarray, group_size: int, axis: int = -2) -> jnp.ndarray:
    """Wq = clamp(round(W / s), -1, 1) * s per group (fp32, w's shape)."""
    return ternary_dequantize(*ternary_codes(w, group_size, axis), group_size, axis)


def ste(w: jnp.ndarray, group_size: int, axis: int = -2) -> jnp.ndarray:
    """The straight-through estimator: value exactly ternary(w), gradient the identity's.

    Written as stop_gradient(Wq) + (W - stop_gradient(W)) rather than W + stop_gradient(Wq - W): the same
    gradient, but the value is Wq bit for bit in fp32 (W - W is exactly 0), which the export relies on.
    """
    return jax.lax.stop_gradient(ternary(w, group_size, axis)) + (w - jax.lax.stop_gradient(w))


def quantise_weights(quant: QuantConfig, weights: dict) -> dict:
    """The weights the forward uses: QUANTISED entries of `weights` (one layer's or stacked) through the
    STE when quant.weights == "ternary"; everything else unchanged."""
    if quant.weights == "none":
        return weights
    return {
        name: _ste_param(name, w, quant.group_size) if name in QUANTISED else w for name, w in weights.items()
    }


def quantised_once(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """The same model with its hidden matrices quantised in `params` (the forward's values, bit for bit) and
    quantisation off in the config: for decoding, which would otherwise re-quantise them at every token."""
    if cfg.quant.weights == "none":
        return cfg, params
    weights = quantise_weights(cfg.quant, {name: params[name] for name in QUANTISED})
    return dataclasses.replace(cfg, quant=QuantConfig()), {**params, **weights}


def _ste_param(name: str, w: jnp.ndarray, group_size: int) -> jnp.ndarray:
    return ste(as_matrix(name, w), group_size).reshape(w.shape)


def param_codes(name: str, w: jnp.ndarray, group_size: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """codes and scales of parameter `name` in its matrix view: codes [..., in, out], scales [..., in/g, out]."""
    return ternary_codes(as_matrix(name, w), group_size)


def ternary_stats(quant: QuantConfig, params: dict) -> dict[str, jnp.ndarray]:
    """Per layer, over all its quantised matrices: the share of weights at 0 and the mean group scale.

    Scalars `quant/zero_frac/layer_{i}` and `quant/scale/layer_{i}` (params stacked on a leading layers axis).
    """
    zeros = weights = scale_sum = groups = 0
    for name in QUANTISED:
        codes, scales = param_codes(
            name, params[name], quant.group_size
        )  # [L, ..., in, out], [L, ..., in/g, out]
        zeros += jnp.sum(codes == 0, axis=tuple(range(1, codes.ndim)))
        weights += codes[0].size
        scale_sum += jnp.sum(scales, axis=tuple(range(1, scales.ndim)))
        groups += scales[0].size
    zero_frac, mean_scale = zeros / weights, scale_sum / groups  # [L]
    stats = {f"quant/zero_frac/layer_{i}": zero_frac[i] for i in range(zero_frac.shape[0])}
    return stats | {f"quant/scale/layer_{i}": mean_scale[i] for i in range(mean_scale.shape[0])}


def pack_ternary(codes: np.ndarray) -> np.ndarray:
    """int8 codes in {-1, 0, 1} [..., n] -> uint8 [..., ceil(n / 4)]: code + 1 in 2 bits, element 4i + j in
    bits 2j..2j+1 of byte i (the first element in the low bits); a short last byte is padded with code 0."""
    codes = np.asarray(codes)
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("ternary codes must be in {-1, 0, 1}")
    n = codes.shape[-1]
    pad = (-n) % 4
    fields = np.pad(codes.astype(np.int16) + 1, [(0, 0)] * (codes.ndim - 1) + [(0, pad)], constant_values=1)
    fields = fields.astype(np.uint8).reshape(*codes.shape[:-1], -1, 4)
    packed = fields[..., 0] | fields[..., 1] << 2 | fields[..., 2] << 4 | fields[..., 3] << 6
    return np.ascontiguousarray(packed, np.uint8)  # C order: safetensors writes the raw buffer


def unpack_ternary(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of pack_ternary: uint8 [..., ceil(n / 4)] -> int8 codes [..., n]."""
    packed = np.asarray(packed, np.uint8)
    if packed.shape[-1] != -(-n // 4):
        raise ValueError(f"{packed.shape[-1]} packed bytes do not hold {n} ternary codes")
    fields = np.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], axis=-1)
    if (fields == 3).any():
        raise ValueError("packed ternary data holds the invalid 2-bit value 3")
    return (fields.reshape(*packed.shape[:-1], -1)[..., :n].astype(np.int8) - 1).astype(np.int8)


TERNARY_METHOD = "mct_ternary"  # quantization_config.quant_method of a ternary export
SCALE_SUFFIX = "_scale"  # the per-group scales of HF tensor NAME sit in NAME + SCALE_SUFFIX


def hf_ternary_tensors(name: str, param: str, value: np.ndarray, group_size: int) -> dict[str, np.ndarray]:
    """One layer of quantised parameter `param` as a ternary export's tensors, in HF's [out, in] orientation:
    `name` = the packed codes uint8 [out, ceil(in / 4)], `name + SCALE_SUFFIX` = fp32 scales [out, in / g]."""
    codes, scales = param_codes(param, value, group_size)  # [in, out], [in / g, out]
    return {
        name: pack_ternary(np.asarray(codes).T),
        name + SCALE_SUFFIX: np.ascontiguousarray(np.asarray(scales).T),
    }


def hf_ternary_weight(packed: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    """The dequantised fp32 HF weight [out, in] of a ternary export's packed codes and scales."""
    if packed.dtype != np.uint8:
        raise ValueError(f"packed ternary codes must be uint8, got {packed.dtype}")
    n_in = scales.shape[-1] * group_size
    return np.asarray(ternary_dequantize(unpack_ternary(packed, n_in), scales, group_size, axis=-1))


def ternary_config(quant: QuantConfig) -> dict:
    """config.json's quantization_config of a ternary export: what import_hf (and a converter) reads back."""
    return {
        "quant_method": TERNARY_METHOD,
        "weights": "ternary",
        "group_size": quant.group_size,
        "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "packing": "2-bit code + 1 (0: -1, 1: 0, 2: +1), four per uint8 along the input dimension of the "
        "[out, in] weight, element 4i + j in bits 2j..2j+1 of byte i",
        "scales": f"fp32 NAME{SCALE_SUFFIX} [out, in / group_size]: weight = code * scale of its group of "
        "group_size consecutive inputs",
    }


def exported_group_size(hf: dict, path: str) -> int:
    """The group size of a ternary export's config.json (`hf`), 0 for unquantised weights; ValueError naming
    `path` for another quantization method or a malformed group size."""
    qc = hf.get("quantization_config")
    if not qc:
        return 0
    if not isinstance(qc, dict) or qc.get("quant_method") != TERNARY_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(
            f"{path}: quantization_config.quant_method {method!r} is not supported "
            f"(mct reads unquantised weights or {TERNARY_METHOD!r})"
        )
    group_size = qc.get("group_size")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(
            f"{path}: quantization_config.group_size must be a positive integer, got {group_size!r}"
        )
    return group_size
