"""Multi-token prediction (MiniCPM4 report section 2.3.2; DeepSeek-V3's sequential MTP modules).

Block k (k = 1..model.mtp.depth) reads h^{k-1}_i (h^0: the main model's last residual stream, before its
final norm) and the embedding of x_{i+k}: Linear(concat(RMSNorm(h^{k-1}_i), RMSNorm(Emb(x_{i+k})))) goes
through one decoder block (causal, per-document attention) to h^k_i, whose RMSNorm meets the shared LM head
to predict x_{i+k+1}. The embedding and the head are the main model's. L = L_ntp + lambda / depth *
sum_k L_mtp^k (lambda = model.mtp.loss_weight). A position counts for block k only when x_{i+1} .. x_{i+k+1}
all lie in its document (packed rows never predict across a boundary).
"""

import jax.numpy as jnp

from mct.config.model import ModelConfig
from mct.model.attention import attend
from mct.model.decoder import LAYER_WEIGHTS, MiniCPM, decoder_layer, rms_norm
from mct.model.loss import masked_loss_sum
from mct.model.rope import rope_tables

MTP_EXTRA_WEIGHTS = ("h_norm", "e_norm", "proj", "out_norm")


def shift_left(x: jnp.ndarray, k: int, fill=0) -> jnp.ndarray:
    """x[:, k:] padded on the right with `fill` to the same length: [batch, seq] -> [batch, seq]."""
    if k == 0:
        return x
    return jnp.concatenate([x[:, k:], jnp.full((x.shape[0], k), fill, x.dtype)], axis=1)


def mtp_weights(model: MiniCPM, k: int) -> dict:
    """Block k's (0-based) weights: LAYER_WEIGHTS + MTP_EXTRA_WEIGHTS, without the leading depth axis."""
    return {name: getattr(model, f"mtp_{name}")[...][k] for name in LAYER_WEIGHTS + MTP_EXTRA_WEIGHTS}


def mtp_step(
    cfg: ModelConfig, h: jnp.ndarray, emb: jnp.ndarray, w: dict, positions: jnp.ndarray, rope, attention
) -> tuple[jnp.ndarray, jnp.ndarray, object]:
    """One MTP block: h [batch, T, d_model] (previous stream), emb [batch, T, d_model] (Emb of the next
    tokens) -> (new stream, normed output for the LM head, attention's aux: the cache when decoding)."""
    x = jnp.concatenate([rms_norm(h, w["h_norm"], cfg.rms_eps), rms_norm(emb, w["e_norm"], cfg.rms_eps)], -1)
    x = jnp.tensordot(x, w["proj"].astype(x.dtype), 1)  # [batch, T, d_model]
    h, aux, _ = decoder_layer(cfg, x, {n: w[n] for n in LAYER_WEIGHTS}, positions, rope, attention)
    return h, rms_norm(h, w["out_norm"], cfg.rms_eps), aux


def mtp_hidden(model: MiniCPM, residual: jnp.ndarray, batch: dict) -> list[jnp.ndarray]:
    """Each block's normed output [batch, seq, d_model] (block k's row i predicts x_{i+k+1}, i.e.
    targets[i + k]); residual: the main model's last stream [batch, seq, d_model]."""
    cfg = model.cfg
    rope = rope_tables(cfg.rope, cfg.head_dim, residual.shape[1], cfg.max_position)
    attention = lambda q, k, v: (attend(q, k, v, batch["segment_ids"], cfg), None)
    h, outputs = residual, []
    for k in range(cfg.mtp.depth):
        emb = model.embed_tokens(shift_left(batch["targets"], k))  # Emb(x_{i+k+1})
        h, out, _ = mtp_step(cfg, h, emb, mtp_weights(model, k), batch["positions"], rope, attention)
        outputs.append(out)
    return outputs


def mtp_targets(batch: dict, k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Block k's (0-based) targets x_{i+k+2} and mask [batch, seq]: 1 where x_{i+1} .. x_{i+k+2} are all
    counted targets of row i's document."""
    mask = batch["loss_mask"].astype(jnp.float32)
    seg = batch["segment_ids"]
    for j in range(1, k + 2):
        same = shift_left(seg, j, -1) == seg
        mask = mask * shift_left(batch["loss_mask"].astype(jnp.float32), j) * same
    return shift_left(batch["targets"], k + 1), mask


def mtp_loss_sums(model: MiniCPM, residual: jnp.ndarray, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum over blocks of each block's masked loss sum / depth, sum of the blocks' counted tokens / depth)."""
    cfg = model.cfg
    total = count = jnp.zeros((), jnp.float32)
    for k, h in enumerate(mtp_hidden(model, residual, batch)):
        targets, mask = mtp_targets(batch, k)
        total = total + masked_loss_sum(
            h, model.head_weight(), targets, mask, cfg.loss_chunk, cfg.unroll_loops
        )
        count = count + jnp.sum(mask)
    return total / cfg.mtp.depth, count / cfg.mtp.depth
