"""The EAGLE draft head (Li et al. 2024: EAGLE section 3, EAGLE-2; FR-Spec, Zhao et al. 2025, section 3).

The head drafts from the target's features: at position t it reads f_t (the target's last residual stream,
before its final norm) and the embedding of x_{t+1}, `fc: concat(Emb(x_{t+1}), f_t) [2d] -> d`, then one
MiniCPM decoder layer of the target's width, heads and RoPE (branch scale scale_depth / sqrt(1): a one-layer
model), whose output predicts f_{t+1}. The target's final norm and LM head (muP's 1/m folded in), and its
embedding, are shared and frozen; at draft time FR-Spec keeps only a frequency-ranked subset of the head's
columns. The head's params are its own dict (`EagleParams`), checkpointed apart from the target's.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mct.config.model import ModelConfig
from mct.model.decoder import (
    LAYER_WEIGHTS,
    MiniCPM,
    ParamsModel,
    _param,
    block_params,
    decoder_layer,
    hidden_std,
    rms_norm,
)


def head_config(cfg: ModelConfig) -> ModelConfig:
    """The target's config as the head's one layer sees it: a dense one-layer stack."""
    return dataclasses.replace(cfg, n_layers=1)


class EagleHead(nnx.Module):
    """fc [2 * d_model, d_model] and one decoder block (LAYER_WEIGHTS, leading [1] axis)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = head_config(cfg)
        d = cfg.d_model
        self.fc = _param(rngs, (2 * d, d), (None, "embed"), hidden_std(cfg), "hidden")
        for name, param in block_params(self.cfg, rngs, 1).items():
            setattr(self, name, param)

    def features(
        self, feature: jnp.ndarray, emb: jnp.ndarray, positions: jnp.ndarray, rope, attention
    ) -> tuple[jnp.ndarray, object]:
        """feature f_t, emb Emb(x_{t+1}) [batch, T, d_model] at positions [batch, T] -> (the predicted
        f_{t+1} [batch, T, d_model], attention's aux: the updated cache when drafting)."""
        x = jnp.concatenate([emb, feature.astype(emb.dtype)], axis=-1)
        x = jnp.tensordot(x, self.fc[...].astype(x.dtype), 1)  # [batch, T, d_model]
        w = {name: getattr(self, name)[...][0] for name in LAYER_WEIGHTS}
        out, aux, _ = decoder_layer(self.cfg, x, w, positions, rope, attention)
        return out, aux


def draft_logits(target: MiniCPM, feature: jnp.ndarray, head: jnp.ndarray) -> jnp.ndarray:
    """The shared, frozen output: RMSNorm with the target's final norm, then head [d_model, V'] -> fp32
    logits [..., V'] (V' < vocab: FR-Spec's subset of columns)."""
    normed = rms_norm(feature, target.final_norm[...], target.cfg.rms_eps)
    return jnp.einsum("...d,dv->...v", normed.astype(jnp.float32), head)


class EagleParams(ParamsModel):
    """The head as pure functions of a params dict (ParamsModel's interface: init, abstract, bind, metadata),
    for a target of config `cfg`; what the shared trainer builds, steps and checkpoints."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.graphdef, self._abstract = nnx.split(nnx.eval_shape(lambda: EagleHead(cfg, rngs=nnx.Rngs(0))))

    def init(self, seed: int) -> dict:
        return nnx.to_pure_dict(nnx.state(EagleHead(self.cfg, rngs=nnx.Rngs(seed))))
