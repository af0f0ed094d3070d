"""Next-token cross-entropy that never holds more than one chunk of fp32 logits.

The LM head matmul and the softmax run chunk by chunk along the sequence under `jax.checkpoint`, so the
backward pass recomputes a chunk's logits instead of storing [batch, seq, vocab] of them.
"""

import jax
import jax.numpy as jnp

from mct.model import MiniCPM


def _chunk_losses(h: jnp.ndarray, w: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """h: [batch, chunk, d_model], w: [d_model, vocab], targets: [batch, chunk] -> losses [batch, chunk]."""
    logits = jnp.einsum("bsd,dv->bsv", h.astype(jnp.float32), w)  # fp32 logits
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logits


def token_losses(model: MiniCPM, batch: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """Per-token cross-entropy [batch, seq] (not yet masked) of the model on a packed batch."""
    h = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [batch, seq, d_model]
    w = model.head_weight()
    chunk = model.cfg.loss_chunk
    seq = h.shape[1]
    if not chunk or chunk >= seq:
        return _chunk_losses(h, w, batch["targets"])
    if seq % chunk:
        raise ValueError(f"config model.loss_chunk={chunk} must divide data.seq_len={seq}")
    n = seq // chunk
    hs = jnp.moveaxis(h.reshape(h.shape[0], n, chunk, -1), 1, 0)  # [n, batch, chunk, d_model]
    ts = jnp.moveaxis(batch["targets"].reshape(-1, n, chunk), 1, 0)  # [n, batch, chunk]
    body = jax.checkpoint(lambda _, xs: (None, _chunk_losses(xs[0], w, xs[1])))
    _, losses = jax.lax.scan(body, None, (hs, ts))  # [n, batch, chunk]
    return jnp.moveaxis(losses, 0, 1).reshape(h.shape[0], seq)


def loss_sums(model: MiniCPM, batch: dict[str, jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of masked token losses, number of counted tokens): summable across micro-batches and hosts."""
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_losses(model, batch) * mask), jnp.sum(mask)
