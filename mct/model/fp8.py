"""FP8 linear layers with fine-grained block scales (DeepSeek-V3 report section 3.3, as MiniCPM4 trains).

A linear layer y = x @ w runs its forward and its input-gradient (dx = dy @ w^T) matmuls on float8_e4m3fn
operands: activations (and dy) are scaled per 1 x 128 tile along the contraction, weights per 128 x 128
block, each tile by amax / 448 (e4m3's largest finite value; values are clipped to it, never NaN). The
products of each 128-wide slice of the contraction accumulate in fp32, are multiplied by the two tiles'
scales and summed in fp32 (the per-slice promotion of DeepSeek-V3). The weight gradient x^T @ dy runs in
bfloat16 with fp32 accumulation; master weights stay fp32 (the optimizer's). A contraction or output size
not a multiple of 128 is zero-padded. On CPU XLA upcasts the fp8 dot (correct numbers, no speed); on
accelerators with an fp8 dot the HLO keeps f8E4M3FN operands (mct.aot prints them).
"""

import math

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
BLOCK = 128


def _pad(x: jnp.ndarray, axis: int, multiple: int) -> jnp.ndarray:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def quantise_tiles(x: jnp.ndarray, block: int = BLOCK) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Activations x [M, K] -> (q [M, K/block, block] fp8, scales [M, K/block] fp32), K padded to `block`."""
    x = _pad(x.astype(jnp.float32), 1, block)
    tiles = x.reshape(x.shape[0], -1, block)
    scale = _scale(jnp.max(jnp.abs(tiles), axis=-1))
    return to_e4m3(tiles / scale[..., None]), scale


def quantise_blocks(w: jnp.ndarray, block: int = BLOCK) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Weights w [K, N] -> (q [K/block, block, N/block, block] fp8, scales [K/block, N/block] fp32)."""
    w = _pad(_pad(w.astype(jnp.float32), 0, block), 1, block)
    blocks = w.reshape(w.shape[0] // block, block, w.shape[1] // block, block)
    scale = _scale(jnp.max(jnp.abs(blocks), axis=(1, 3)))
    return to_e4m3(blocks / scale[:, None, :, None]), scale


def _scale(amax: jnp.ndarray) -> jnp.ndarray:
    """amax / 448, or 1 for an all-zero tile (nothing to scale)."""
    return jnp.where(amax > 0, amax / FP8_MAX, 1.0)


def to_e4m3(x: jnp.ndarray) -> jnp.ndarray:
    """fp32 -> e4m3 with round-to-nearest-even, saturating at +-448 (a plain cast overflows to NaN)."""
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)


def dequantise_tiles(q: jnp.ndarray, scale: jnp.ndarray, k: int) -> jnp.ndarray:
    """Inverse of quantise_tiles (up to rounding): [M, K/block, block], [M, K/block] -> [M, k] fp32."""
    return (q.astype(jnp.float32) * scale[..., None]).reshape(q.shape[0], -1)[:, :k]


def dequantise_blocks(q: jnp.ndarray, scale: jnp.ndarray, k: int, n: int) -> jnp.ndarray:
    """Inverse of quantise_blocks (up to rounding) -> [k, n] fp32."""
    w = q.astype(jnp.float32) * scale[:, None, :, None]
    return w.reshape(q.shape[0] * q.shape[1], -1)[:k, :n]


def _scaled_dot(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x [M, K] @ w [K, N] on fp8 tiles (x per 1 x 128, w per 128 x 128), fp32 per-slice accumulation -> fp32."""
    n = w.shape[1]
    qx, sx = quantise_tiles(x)  # [M, Kb, 128], [M, Kb]
    qw, sw = quantise_blocks(w)  # [Kb, 128, Nb, 128], [Kb, Nb]
    kb, _, nb, _ = qw.shape
    partial = jax.lax.dot_general(
        qx,
        qw.reshape(kb, BLOCK, nb * BLOCK),
        (((2,), (1,)), ((1,), (0,))),
        preferred_element_type=jnp.float32,
    )  # [Kb, M, N_padded]: one fp32 sum per 128-wide slice of the contraction
    scales = sx.T[:, :, None] * jnp.repeat(sw, BLOCK, axis=1)[:, None, :]  # [Kb, M, N_padded]
    return jnp.sum(partial * scales, axis=0)[:, :n]


@jax.custom_vjp
def fp8_matmul(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x [M, K] @ w [K, N] in FP8 (see the module docstring); result in x's dtype."""
    return _scaled_dot(x, w).astype(x.dtype)


def _fwd(x, w):
    return fp8_matmul(x, w), (x.astype(jnp.bfloat16), w)


def _bwd(residuals, g):
    x_bf16, w = residuals
    dx = _scaled_dot(g, w.T).astype(g.dtype)  # input gradient: fp8, dy tiled along N, w^T blocks
    dw = jnp.dot(x_bf16.T, g.astype(jnp.bfloat16), preferred_element_type=jnp.float32)  # bf16 wgrad
    return dx, dw.astype(w.dtype)


fp8_matmul.defvjp(_fwd, _bwd)


def fp8_linear(x: jnp.ndarray, w: jnp.ndarray, n: int) -> jnp.ndarray:
    """The model's `linear` hook (mct/model/decoder.py Linear) in FP8: x's last n axes contract with w's first n."""
    k_shape, out_shape = w.shape[:n], w.shape[n:]
    k, lead = math.prod(k_shape), x.shape[: x.ndim - n]
    y = fp8_matmul(x.reshape(-1, k), w.reshape(k, -1))
    return y.reshape(*lead, *out_shape)


__all__ = ["fp8_linear", "fp8_matmul", "quantise_blocks", "quantise_tiles", "to_e4m3"]
