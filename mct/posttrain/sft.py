"""Supervised fine-tuning on chat data (MiniCPM4 report, SFT).

The run is a pre-training run (mct.run.training_run: lock, resume, hooks, checkpoints, SIGTERM save) whose mixture is
the chat files of data.chat, each prepared once with the source run's tokenizer into a masked dataset
(mct/posttrain/chat_data.py), so the loss covers assistant content and its `<|im_end|>` only. It starts from
init_from's params with a fresh optimizer; with schedule.lr_from_init the WSD peak is the source's final lr.
A batch or an eval set without loss tokens is an error naming the chat files.
"""

import dataclasses
import threading

import jax.numpy as jnp
import numpy as np

from data_pipelines.config import MixtureComponent
from data_pipelines.loader import cache_root
from data_pipelines.shards import DatasetError
from data_pipelines.tokenizer import TextTokenizer
from mct.config.run import Config
from mct.errors import ConfigError, UserError
from mct.posttrain.chat_data import chat_dataset_dir
from mct.run.init_from import read_init_source, with_init_lr
from mct.run.training_run import RunData, train
from mct.train.trainer import TrainSetup


def init_tokenizer(config: Config) -> TextTokenizer:
    """The tokenizer of the init_from run (post-training must keep its ids)."""
    if not config.init_from:
        raise ConfigError(
            "config init_from is empty: post-training starts from a run (--config.init_from=WORKDIR)"
        )
    source = read_init_source(config.init_from)
    try:
        return source.run.tokenizer()
    except (OSError, ValueError) as e:
        raise UserError(f"config init_from={config.init_from}: {e}") from None


def file_weights(paths: tuple[str, ...], weights: tuple[float, ...], key: str) -> list[float]:
    """One weight per file (() = equal); ConfigError naming `key` otherwise."""
    if not paths:
        raise ConfigError(f"config {key}.path is empty: name JSONL files or 'default'")
    if weights and (len(weights) != len(paths) or min(weights) < 0 or not sum(weights)):
        raise ConfigError(f"config {key}.weights={weights} needs one weight >= 0 per path {paths}, not all 0")
    return list(weights) or [1.0] * len(paths)


def sft_config(config: Config) -> Config:
    """`config` with data.mixture = the prepared chat files (weighted) and, with schedule.lr_from_init, the
    source's final lr as the peak."""
    chat, data = config.data.chat, config.data
    tokenizer = init_tokenizer(config)
    mixture = {}
    for i, (path, weight) in enumerate(zip(chat.path, file_weights(chat.path, chat.weights, "data.chat"))):
        directory = chat_dataset_dir(
            path,
            tokenizer,
            seq_len=data.seq_len,
            eval_fraction=chat.eval_fraction,
            cache_root=cache_root(data.cache_dir),
        )
        mixture[f"chat{i}"] = MixtureComponent(str(directory), weight)
    return with_init_lr(config.replace(data=dataclasses.replace(data, mixture=mixture)))


def with_source_data(config: Config) -> Config:
    """`config` reading the init_from run's data mixture (its tokenizer's dataset, its held-out split), with
    schedule.lr_from_init applied."""
    source = read_init_source(config.init_from)
    return with_init_lr(
        config.replace(data=dataclasses.replace(config.data, mixture=source.config.data.mixture))
    )


class CheckedBatches:
    """A train iterator whose every batch must hold loss tokens (else DatasetError naming the files)."""

    def __init__(self, batches, files: tuple[str, ...]):
        self._batches, self._files, self._step = batches, files, 0

    def __iter__(self) -> "CheckedBatches":
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        self._step += 1
        if not np.any(batch["loss_mask"]):
            raise DatasetError(
                f"data batch {self._step} has no loss tokens (no assistant content): {self._files}"
            )
        return batch

    def get_state(self) -> dict:
        return self._batches.get_state()


class ChatData(RunData):
    """Pre-training's batches from the chat mixture, checked for loss tokens."""

    def train_batches(self, setup: TrainSetup, state: dict | None):
        return CheckedBatches(super().train_batches(setup, state), setup.config.data.chat.path)

    def eval_sets(self, setup: TrainSetup) -> dict[str, list]:
        sets = super().eval_sets(setup)
        if not any(float(jnp.sum(b["loss_mask"])) for b in sets["eval_loss"]):
            raise DatasetError(f"the eval batches of {setup.config.data.chat.path} have no loss tokens")
        return sets


def train_sft(config: Config, devices: list | None = None, stop: threading.Event | None = None) -> dict:
    """Runs (or resumes) SFT in config.workdir; returns the last logged metrics and eval losses."""
    return train(sft_config(config), devices, stop, data=ChatData())
