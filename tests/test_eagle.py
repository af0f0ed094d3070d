"""EAGLE draft heads: training on a frozen target (the trained head agrees with the target more often than a
random one), and bad input named in one line."""

import json

import jax
import numpy as np
import pytest

from data_pipelines.loader import make_eval_batches
from mct.config.posttrain import EagleRunConfig
from mct.errors import UserError
from mct.model.decoder import ParamsModel
from mct.model.eagle import EagleParams
from mct.posttrain.eagle import WithTarget, eagle_config, eagle_objective, read_target, train_eagle
from tests.tiny_runs import make_config

ONE = jax.devices()[:1]


def eagle_run(root, target, dataset, **extra):
    """The tiny config of a head for `target` in root/draft."""
    o = {
        "eagle.target": str(target),
        "train.steps": 40,
        "optimizer.lr": 3e-3,
        "schedule.warmup_steps": 2,
        "schedule.decay_steps": 5,
        "checkpoint.every_steps": 20,
        "checkpoint.async_save": False,
        **extra,
    }
    return make_config(root / "draft", dataset, EagleRunConfig, **o)


@pytest.fixture(scope="module")
def trained_head(pretrained, tmp_path_factory):
    """(draft workdir, its resolved config) of a 40-step head for the tiny pre-trained target."""
    target, dataset = pretrained
    config = eagle_run(tmp_path_factory.mktemp("eagle"), target, dataset)
    train_eagle(config, devices=ONE)
    return config.workdir, eagle_config(config)


def agreement(config: EagleRunConfig, head_params: dict) -> float:
    """The head's top-1 agreement with the target over the held-out batches (the objective's metric)."""
    target = read_target(config.eagle.target)
    model = WithTarget(EagleParams(config.model), ParamsModel(config.model), target.read_params())
    batches = make_eval_batches(
        config.data, batch_size=8, num_batches=2, process_index=0, process_count=1,
        model_vocab_size=config.model.vocab_size,
    )
    objective = eagle_objective(1.0, 0.1)
    sums = [objective(model.bind(head_params), b) for b in batches]
    return float(sum(s[2]["top1_agreement"] for s in sums) / sum(s[1] for s in sums))


def test_trained_head_agrees_with_the_target_more_than_a_random_head(trained_head):
    workdir, config = trained_head
    lines = [json.loads(x) for x in open(f"{workdir}/metrics.jsonl")]
    logged = [m for m in lines if "top1_agreement" in m]
    assert {"feature_loss", "token_loss", "top1_agreement"} <= set(logged[-1])
    assert logged[-1]["loss"] < logged[0]["loss"]
    trained = read_target(workdir)
    random_head = EagleParams(config.model).init(0)
    got = agreement(config, trained.checkpoint.read_params(jax.eval_shape(lambda: random_head)))
    print("agreement", got, agreement(config, random_head))
    assert got > agreement(config, random_head)
