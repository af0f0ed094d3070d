"""Pre-training's objective for every model option: next-token loss, + lambda * MTP loss (mct/model/mtp.py), +
the MoE routers' load-balancing and z losses (mct/model/moe.py); their parts are the step's extra metrics."""

import jax.numpy as jnp

from mct.model.decoder import MiniCPM
from mct.model.loss import masked_loss_sum
from mct.model.mtp import mtp_loss_sums


def pretraining_objective(model: MiniCPM, batch: dict) -> tuple[jnp.ndarray, jnp.ndarray, dict]:
    """(loss sum, counted tokens, extras) of train_step.Objective. The MTP and router losses are means
    weighted by the next-token count so the step's loss is L_ntp + lambda L_mtp + w_aux L_aux + w_z L_z.

    extras (each reported divided by the count): ntp_loss and mtp_loss (per next-token target; mtp_tokens
    is the fraction of targets MTP counts, so mtp_loss / mtp_tokens is its mean); moe_aux_loss, moe_z_loss
    (layer means) and moe_dropped (dropped token-expert assignments per token, summed over layers).
    """
    cfg = model.cfg
    mask = batch["loss_mask"].astype(jnp.float32)
    out = model.forward(batch["tokens"], batch["positions"], batch["segment_ids"])
    ntp = masked_loss_sum(
        out.hidden, model.head_weight(), batch["targets"], mask, cfg.loss_chunk, cfg.unroll_loops
    )
    count = jnp.sum(mask)
    total, extras = ntp, {}
    if cfg.mtp.depth:
        mtp, mtp_count = mtp_loss_sums(model, out.residual, batch)
        total = total + cfg.mtp.loss_weight * mtp
        extras.update(ntp_loss=ntp, mtp_loss=mtp, mtp_tokens=mtp_count)
    if cfg.moe.num_experts:
        aux, z = jnp.mean(out.stats["aux_loss"]), jnp.mean(out.stats["z_loss"])
        total = total + count * (cfg.moe.aux_loss_weight * aux + cfg.moe.z_loss_weight * z)
        tokens = batch["tokens"].size
        extras.update(
            moe_aux_loss=aux * count,
            moe_z_loss=z * count,
            moe_dropped=jnp.sum(out.stats["dropped"]) * count / tokens,
        )
    return total, count, extras
