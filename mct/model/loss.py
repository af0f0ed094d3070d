"""Next-token cross-entropy that never holds more than one chunk of fp32 logits, and never recomputes them.

The LM head matmul and the softmax run chunk by chunk along the sequence (model.loss_chunk tokens per row,
0 = the whole sequence). The training loss is a fused custom-VJP: its forward pass also forms each chunk's
logit gradient (softmax - one_hot) and contracts it into dh and dw right away, so the backward pass only
scales them; the head costs 3 matmuls per token (as the 6N FLOP count assumes) and no [tokens, vocab]
array outlives its chunk.
"""

import functools

import jax
import jax.numpy as jnp

from mct.model.decoder import MiniCPM


def _split(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """[batch, seq, ...] -> [seq // chunk, batch, chunk, ...] (each chunk keeps every row: sharding stays even)."""
    b, s = x.shape[:2]
    if s % chunk:  # validate.py catches it in a config; this guards direct callers
        raise ValueError(f"config model.loss_chunk={chunk} must divide data.seq_len={s}")
    return jnp.moveaxis(x.reshape(b, s // chunk, chunk, *x.shape[2:]), 1, 0)


def _merge(x: jnp.ndarray) -> jnp.ndarray:
    """Inverse of _split: [n, batch, chunk, ...] -> [batch, n * chunk, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _logits_losses(h, w, targets):
    """h: [batch, chunk, d_model], w: [d_model, vocab] fp32, targets: [batch, chunk] -> logits [batch, chunk,
    vocab] fp32, their logsumexp [batch, chunk] and the targets' cross-entropy [batch, chunk]."""
    logits = jnp.einsum("bsd,dv->bsv", h.astype(jnp.float32), w)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return logits, lse, lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _chunk_pass(h, w, targets, mask, with_grads: bool):
    """One chunk. h: [batch, chunk, d_model], w: [d_model, vocab] fp32, targets/mask: [batch, chunk].

    Returns per-token losses [batch, chunk] and, with_grads, d(sum(mask * losses)) wrt h and w.
    """
    logits, lse, losses = _logits_losses(h, w, targets)
    if not with_grads:
        return losses, None, None
    probs = jnp.exp(logits - lse[..., None])
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    dlogits = jnp.where(is_target, probs - 1.0, probs) * mask[..., None]  # [batch, chunk, vocab]
    dh = jnp.einsum("bsv,dv->bsd", dlogits, w).astype(h.dtype)
    dw = jnp.einsum("bsd,bsv->dv", h.astype(jnp.float32), dlogits)
    return losses, dh, dw


def _all_chunks(h, w, targets, mask, chunk: int, with_grads: bool, unroll: bool = False):
    """_chunk_pass over the sequence in chunks (a loop, or unrolled): losses [batch, seq], dh [batch, seq,
    d_model], dw [d_model, vocab]."""
    if not chunk or chunk >= h.shape[1]:
        return _chunk_pass(h, w, targets, mask, with_grads)

    def body(dw, xs):
        h_chunk, targets_chunk, mask_chunk = xs
        losses, dh, dw_chunk = _chunk_pass(h_chunk, w, targets_chunk, mask_chunk, with_grads)
        return (dw + dw_chunk if with_grads else dw), (losses, dh)

    dw0 = jnp.zeros_like(w) if with_grads else None
    xs = tuple(_split(x, chunk) for x in (h, targets, mask))
    dw, (losses, dh) = jax.lax.scan(body, dw0, xs, unroll=unroll)
    return _merge(losses), (_merge(dh) if with_grads else None), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def masked_loss_sum(
    h: jnp.ndarray, w: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray, chunk: int, unroll: bool
):
    """sum(mask * cross_entropy(h @ w, targets)) as an fp32 scalar; h: [batch, seq, d_model], w: [d_model, vocab];
    unroll: the chunk loop unrolled (model.unroll_loops)."""
    losses, _, _ = _all_chunks(h, w, targets, mask, chunk, False, unroll)
    return jnp.sum(losses * mask)


def _loss_fwd(h, w, targets, mask, chunk, unroll):
    losses, dh, dw = _all_chunks(h, w, targets, mask, chunk, True, unroll)
    return jnp.sum(losses * mask), (dh, dw)


def _loss_bwd(chunk, unroll, residuals, g):
    dh, dw = residuals
    return (g * dh).astype(dh.dtype), g * dw, None, None


masked_loss_sum.defvjp(_loss_fwd, _loss_bwd)


def token_losses(model: MiniCPM, batch: dict[str, jnp.ndarray]) -> jnp.ndarray:
    """Per-token cross-entropy [batch, seq] (not yet masked) of the model on a packed batch; for evaluation."""
    h = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [batch, seq, d_model]
    ones = jnp.ones(batch["targets"].shape, jnp.float32)
    losses, _, _ = _all_chunks(h, model.head_weight(), batch["targets"], ones, model.cfg.loss_chunk, False)
    return losses


def loss_sums(model: MiniCPM, batch: dict[str, jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of masked token losses, number of counted tokens): summable across micro-batches and hosts."""
    mask = batch["loss_mask"].astype(jnp.float32)
    h = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [batch, seq, d_model]
    cfg = model.cfg
    total = masked_loss_sum(h, model.head_weight(), batch["targets"], mask, cfg.loss_chunk, cfg.unroll_loops)
    return total, jnp.sum(mask)


def token_scores(model: MiniCPM, batch: dict[str, jnp.ndarray]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Each target's log-prob [batch, seq] fp32 and whether it is the argmax [batch, seq] bool, on a packed
    batch: what downstream evaluation reads (log-likelihoods, lm-eval-harness's is_greedy). The head runs in
    model.loss_chunk pieces, as in training, so no [batch, seq, vocab] array is held whole."""
    h = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [batch, seq, d_model]
    w, chunk = model.head_weight(), model.cfg.loss_chunk

    def scores(h, targets):  # one chunk: h [batch, chunk, d_model], targets [batch, chunk]
        logits, _, losses = _logits_losses(h, w, targets)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return -losses, target_logit >= jnp.max(logits, axis=-1)

    if not chunk or chunk >= h.shape[1]:
        return scores(h, batch["targets"])
    split = (_split(h, chunk), _split(batch["targets"], chunk))
    logprobs, greedy = jax.lax.map(lambda xs: scores(*xs), split)
    return _merge(logprobs), _merge(greedy)
