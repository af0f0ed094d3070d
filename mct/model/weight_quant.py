"""Weight-only int8 / int4 quantisation for decoding (CPM.cu's W4A16): the hidden matrices are quantised once
at load, stored as integer codes and fp32 scales, and dequantised inside the matmul, so a decode step reads a
quarter (int8) or an eighth (int4, when the backend packs it) of the fp32 weight bytes.

Symmetric round-to-nearest per group of `group` consecutive weights along a matrix's input (contraction)
dimension: s = max|W_g| / qmax, codes = clip(round(W / s), -qmax, qmax), qmax = 2^(bits-1) - 1. int8 uses one
group per output channel (the whole input), int4 groups of 128. The matmul contracts each group with its
integer codes and scales the group's partial sums: y[o] = sum_g s[g, o] * sum_k x[g, k] * codes[g, k, o].

Parameters keep mct's layout [layers, in..., out...] (quant.MATRIX_DIMS); a QuantizedMatrix holds codes
[layers, groups, group, out...] and scales [layers, groups, out...].
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mct.model.quant import MATRIX_DIMS

INT4_GROUP = 128
MODES = ("none", "int8", "int4")
_TINY = 1e-12  # smallest scale: an all-zero group quantises to zeros, not NaN


class QuantizedMatrix(NamedTuple):
    """A weight matrix as integer codes and per-group scales (a pytree: scans slice its leading layers axis)."""

    codes: jax.Array  # [lead..., groups, group, out...] int8 (int4: values in -7..7)
    scales: jax.Array  # [lead..., groups, out...] fp32


def quantize_param(name: str, w: jax.Array, mode: str) -> QuantizedMatrix:
    """Parameter `name` of mct's layout ([lead..., in..., out...], MATRIX_DIMS) quantised by `mode`."""
    n_in, n_out = MATRIX_DIMS[name]
    n_lead = w.ndim - n_in - n_out
    fan_in = math.prod(w.shape[n_lead : n_lead + n_in])
    group = fan_in if mode == "int8" else INT4_GROUP
    if fan_in % group:
        raise ValueError(f"--quant {mode}: groups of {group} do not divide {name}'s input dimension {fan_in}")
    grouped = w.reshape(*w.shape[:n_lead], fan_in // group, group, *w.shape[n_lead + n_in :])
    return quantize_groups(grouped, n_lead + 1, bits=8 if mode == "int8" else 4)


def quantize_groups(g: jax.Array, axis: int, bits: int) -> QuantizedMatrix:
    """Symmetric round-to-nearest of weights g whose `axis` runs along a group (codes: g's shape, int8)."""
    qmax = 2 ** (bits - 1) - 1
    g = jnp.asarray(g, jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(g), axis=axis, keepdims=True) / qmax, _TINY)
    codes = jnp.clip(jnp.round(g / scale), -qmax, qmax).astype(jnp.int8)
    return QuantizedMatrix(codes, jnp.squeeze(scale, axis))


def dequantize(q: QuantizedMatrix, axis: int) -> jax.Array:
    """The weights q stands for, codes * scales in fp32 with q's shape (`axis` runs along a group; for
    checks: decoding never builds them)."""
    return q.codes.astype(jnp.float32) * jnp.expand_dims(q.scales, axis)


def quantized_linear(x: jax.Array, q: QuantizedMatrix, n: int) -> jax.Array:
    """The model's `linear` hook on a quantised matrix: x [..., in...] (n input dims) -> [..., out...].

    One layer's q (no lead): codes [groups, group, out...]. The integer codes meet x in x's dtype block by block
    (blocks of 128 inputs within a group: XLA's CPU dot keeps the conversion inside a batched contraction, where
    one long contraction would first build the fp32 matrix), and each group's partial sums are scaled after.
    """
    groups, group = q.codes.shape[:2]
    out_shape = q.codes.shape[2:]
    lead = x.shape[: x.ndim - n]
    blocks = group // INT4_GROUP if group % INT4_GROUP == 0 else 1
    xb = x.reshape(-1, groups, blocks, group // blocks)  # [tokens, groups, blocks, block]
    codes = q.codes.reshape(groups, blocks, group // blocks, -1).astype(
        x.dtype
    )  # [groups, blocks, block, out]
    partial = jnp.einsum("tgbk,gbko->tgbo", xb, codes, preferred_element_type=jnp.float32).sum(axis=2)
    y = jnp.einsum("tgo,go->to", partial, q.scales.reshape(groups, -1))  # [tokens, out]
    return y.astype(x.dtype).reshape(*lead, *out_shape)
