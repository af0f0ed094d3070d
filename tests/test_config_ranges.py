"""The run config's range checks refuse the values that would silently damage a run (a 0 that deletes, disables
or zeroes, a negative that flips, a NaN or inf float), naming the key; the valid edge values still pass."""

import math

import pytest

from mct.config.posttrain import RLRunConfig
from mct.config.run import Config
from mct.errors import ConfigError

# an RL run whose prompt and response fit the default data.seq_len, so only the value under test is wrong
RL_FIT = {"rl.max_prompt_tokens": 16, "rl.max_response_tokens": 16}


def validated(cls: type[Config] = Config, **dotted) -> Config:
    """cls from dotted overrides ("optimizer.grad_clip": -1.0), resolved and validated on one device."""
    values: dict = {}
    for key, value in dotted.items():
        *sections, name = key.split(".")
        node = values
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    config = cls.from_dict(values).resolve()
    config.validate(n_devices=1)
    return config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"checkpoint.max_to_keep": 0}, "checkpoint.max_to_keep=0 must be positive"),
        ({"optimizer.grad_clip": -1.0}, "optimizer.grad_clip=-1.0 must be positive"),
        ({"optimizer.grad_clip": 0.0}, "optimizer.grad_clip=0.0 must be positive"),
        ({"data.eval_batches": 0}, "data.eval_batches=0 must be positive"),
        ({"eval.tasks_every_steps": -1}, "eval.tasks_every_steps=-1 must be >= 0"),
        ({"optimizer.lr": math.inf}, "optimizer.lr=inf must be finite"),
        ({"data.mixture.default.weight": math.nan}, "data.mixture.default.weight=nan must be finite"),
        ({"optimizer.b2": 1.0}, "optimizer.b2=1.0 must be in"),
        ({"optimizer.eps": 0.0}, "optimizer.eps=0.0 must be positive"),
        ({"optimizer.weight_decay": -0.1}, "optimizer.weight_decay=-0.1 must be >= 0"),
        ({"schedule.lr_min": -0.001}, "schedule.lr_min=-0.001 must be >= 0"),
        ({"schedule.half_life": -10}, "schedule.half_life=-10"),
        ({"data.num_epochs": -1}, "data.num_epochs=-1 must be >= 0"),
        ({"data.prefetch": -1}, "data.prefetch=-1 must be >= 0"),
        ({"data.packing_bins": 0}, "data.packing_bins=0 must be positive"),
        ({"model.rms_eps": 0.0}, "model.rms_eps=0.0 must be positive"),
        ({"model.rope.theta": -1.0}, "model.rope.theta=-1.0 must be positive"),
        ({"model.moe.num_experts": 4, "model.moe.aux_loss_weight": -0.01}, "model.moe.aux_loss_weight=-0.01"),
        (
            {"profile.steps": [4, 2]},
            r"profile.steps=\(4, 2\) must be \(\) or \(first, last\) with first < last",
        ),
    ],
)
def test_values_that_damage_a_run_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validated(**overrides)


def test_post_training_sections_are_checked_too():
    with pytest.raises(ConfigError, match="rl.temperature=inf must be finite"):
        validated(RLRunConfig, **RL_FIT, **{"rl.temperature": math.inf})


def test_edge_values_with_a_meaning_still_pass():
    validated(
        **{
            "schedule.warmup_steps": -1,  # -1: from warmup_fraction
            "schedule.half_life": 0,  # 0: decay_steps / 5
            "schedule.lr_min": 0.0,
            "optimizer.grad_clip": 1e9,  # clips nothing
            "optimizer.b1": 0.0,
            "optimizer.weight_decay": 0.0,
            "checkpoint.max_to_keep": 1,
            "data.eval_batches": 1,
            "data.num_epochs": 0,  # repeat forever
            "data.prefetch": 0,  # on the training thread
            "profile.steps": [2, 4],
        }
    )
