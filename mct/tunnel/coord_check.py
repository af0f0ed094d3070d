"""Coordinate check: per-layer activation scales across widths after a few Adam steps, muP vs standard.

Under muP the residual-stream and logit scales stay flat as the width grows (what makes hyperparameters
transfer from proxies); under standard parametrization the logits grow with width.
"""

import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mct.config.model import ModelConfig
from mct.config.run import Config, OptimizerConfig, ScheduleConfig, TrainConfig
from mct.train.trainer import build  # noqa: E402


def _config(
    width: int, parametrization: str, *, n_layers: int, lr: float, vocab: int, steps: int, batch: int
) -> Config:
    heads = max(1, width // 32)
    model = ModelConfig(
        n_layers=n_layers,
        d_model=width,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=width // heads,
        d_mlp=int(2.5 * width),
        vocab_size=vocab,
        parametrization=parametrization,
    )
    return Config(
        model=model,
        train=TrainConfig(steps=steps, batch_size=batch),
        optimizer=OptimizerConfig(lr=lr, weight_decay=0.0),
        schedule=ScheduleConfig(warmup_steps=0, decay_steps=1),
    )


def coord_check(
    widths=(64, 128, 256, 512),
    parametrizations=("mup", "sp"),
    *,
    steps: int = 5,
    n_layers: int = 4,
    lr: float = 0.01,
    seq: int = 64,
    batch: int = 8,
    vocab: int = 512,
    seed: int = 0,
) -> dict:
    """{parametrization: {width: {"layers": [mean |h| after each layer], "logits": mean |logit|}}} measured
    after `steps` AdamW steps on one fixed random batch."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1))
    data = {
        "tokens": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((batch, seq), jnp.int32),
        "positions": jnp.tile(jnp.arange(seq, dtype=jnp.int32), (batch, 1)),
        "loss_mask": jnp.ones((batch, seq), jnp.float32),
    }
    out = {}
    for parametrization in parametrizations:
        out[parametrization] = {}
        for width in widths:
            config = _config(
                width, parametrization, n_layers=n_layers, lr=lr, vocab=vocab, steps=steps + 1, batch=batch
            )
            setup = build(config, jax.devices()[:1])
            state = setup.init_state(seed)
            for i in range(steps):
                state, _ = setup.step_fn(state, data, jnp.int32(i))
            m = setup.model.bind(state["params"])
            h, layers = m(data["tokens"], data["positions"], data["segment_ids"], return_layers=True)
            logits = jnp.einsum("bsd,dv->bsv", h, m.head_weight())
            out[parametrization][width] = {
                "layers": [float(x) for x in jnp.mean(jnp.abs(layers), axis=(1, 2, 3))],
                "logits": float(jnp.mean(jnp.abs(logits))),
            }
    return out


def plot_coord_check(result: dict, path: str | pathlib.Path) -> pathlib.Path:
    """One panel per parametrization: activation scale vs width, a line per layer and one for the logits."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(result), figsize=(5 * len(result), 4), squeeze=False)
    for ax, (parametrization, by_width) in zip(axes[0], result.items()):
        widths = sorted(by_width)
        n_layers = len(by_width[widths[0]]["layers"])
        for layer in range(n_layers):
            ax.plot(
                widths, [by_width[w]["layers"][layer] for w in widths], marker="o", label=f"layer {layer}"
            )
        ax.plot(widths, [by_width[w]["logits"] for w in widths], marker="s", color="k", label="logits")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (d_model)")
        ax.set_ylabel("mean |activation|")
        ax.set_title(f"{parametrization}: coordinate check")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
