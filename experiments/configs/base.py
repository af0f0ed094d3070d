"""The defaults every experiment starts from: mct.config's typed schema as an ml_collections ConfigDict.

Every key a run may set exists here, so a mistyped `--config.x.y=...` override fails loudly; the entry point
converts the result back into its typed run config (`mct.config.run.Config`, or a post-training entry point's
class from `mct.config.posttrain`) once.
"""

import dataclasses

import ml_collections

from data_pipelines.config import MixtureComponent
from mct.config.model import ModelConfig
from mct.config.run import Config


def model_config(
    *, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_mlp: int, vocab_size: int
) -> ml_collections.ConfigDict:
    """A MiniCPM model with muP; only the shape varies between experiments."""
    shape = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        d_mlp=d_mlp,
        vocab_size=vocab_size,
    )
    return ml_collections.ConfigDict(dataclasses.asdict(ModelConfig(**shape)))


def base_config(run_class: type[Config] = Config) -> ml_collections.ConfigDict:
    """The defaults of a run config class (pre-training's Config, or a post-training entry point's)."""
    return ml_collections.ConfigDict(dataclasses.asdict(run_class()))


def for_run(c: ml_collections.ConfigDict, run_class: type[Config]) -> ml_collections.ConfigDict:
    """`c` with the sections `run_class` adds to it, at their defaults: a post-training experiment (e.g.
    mct.config.posttrain.RLRunConfig's) built on a pre-training one."""
    defaults = base_config(run_class)
    for name in defaults.keys():
        if name not in c:
            c[name] = defaults[name]
    return c


def mixture(components: dict[str, MixtureComponent]) -> ml_collections.ConfigDict:
    """A data.mixture value from named components."""
    return ml_collections.ConfigDict({name: dataclasses.asdict(c) for name, c in components.items()})


def get_config() -> ml_collections.ConfigDict:
    """The bare defaults (what `mct.import_hf` builds an imported workdir for when given no --config)."""
    return base_config()
