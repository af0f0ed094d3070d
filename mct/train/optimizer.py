"""AdamW with muP per-group learning rates, a weight-decay mask and global-norm clipping (optax).

Hidden matrices (lr_group "hidden") get lr / m, embeddings and norms get lr (docs/design.md, Algorithms / Model).
Weight decay applies to matrices, and to the embedding only when optimizer.decay_embeddings is set.
"""

import optax

from mct.config.run import Config
from mct.model.decoder import ParamsModel, width_multiplier
from mct.train.schedule import schedule_from_config


def make_optimizer(config: Config, model: ParamsModel) -> optax.GradientTransformation:
    o = config.optimizer
    schedule = schedule_from_config(config)
    m = width_multiplier(config.model)
    groups = model.metadata("lr_group")
    axes = model.metadata("logical_axes")
    is_embedding = {name: "vocab" in ax and groups[name] == "vector" for name, ax in axes.items()}
    decay_mask = {
        name: groups[name] == "hidden" or (is_embedding[name] and o.decay_embeddings) for name in groups
    }

    def adamw(lr_scale: float) -> optax.GradientTransformation:
        return optax.adamw(
            lambda step: schedule(step) * lr_scale,
            b1=o.b1,
            b2=o.b2,
            eps=o.eps,
            weight_decay=o.weight_decay,
            mask=decay_mask,
        )

    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.multi_transform({"hidden": adamw(1.0 / m), "vector": adamw(1.0)}, groups),
    )
