"""Analytic FLOP counts and the machine's measured matmul peak, for MFU.

Per token, training (forward + backward) costs 6 * N_matmul + 6 * n_layers * seq * (n_heads * head_dim):
N_matmul counts every parameter used in a matmul (all of them but the RMSNorm scales, and less the input
embedding when it is not tied to the LM head, since a lookup is no matmul); the second term is causal attention
(QK^T and PV, 2 matmuls x 2 FLOPs x 3 passes, halved by the causal mask). MoE layers count the top_k experts a
token runs (active parameters); each MTP block is one more attention layer and one more pass of the shared LM head.

MCT_MATMUL_PEAK=<FLOP/s> replaces the measured peak (test runs set it: measuring costs every run a second).
"""

import math
import os
import time

import jax
import jax.numpy as jnp

from mct.config.model import ModelConfig
from mct.model.decoder import ParamsModel


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters of the matmuls one token runs through (MoE: only its top_k experts; no norm scales)."""
    leaves = jax.tree_util.tree_leaves_with_path(ParamsModel(cfg).abstract())
    n = sum(math.prod(leaf.shape) for path, leaf in leaves if not str(path[-1].key).endswith("norm"))
    n += cfg.mtp.depth * cfg.vocab_size * cfg.d_model  # MTP: the head once more per block
    if cfg.moe.num_experts:
        n -= cfg.n_layers * (cfg.moe.num_experts - cfg.moe.top_k) * 3 * cfg.d_model * cfg.d_mlp
    return n if cfg.tie_embeddings else n - cfg.vocab_size * cfg.d_model


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    attention_layers = cfg.n_layers + cfg.mtp.depth
    return 6.0 * matmul_params(cfg) + 6.0 * attention_layers * seq_len * cfg.n_heads * cfg.head_dim


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best achieved FLOP/s of an n x n matmul on the default device (the MFU denominator), or the FLOP/s
    that $MCT_MATMUL_PEAK names, for runs where the measurement's second of compute matters more than MFU."""
    if override := os.environ.get("MCT_MATMUL_PEAK"):
        return float(override)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best
