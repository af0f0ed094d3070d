"""Trains an EAGLE draft head (FR-Spec's drafter) on a frozen target run:
python -m mct.eagle --target TARGET_WORKDIR [--config experiments/configs/tiny_cpu_eagle.py] --config.workdir DRAFT

Flags and wiring only: `mct.posttrain.eagle` runs it (its docstring says how). --config defaults to
experiments/configs/tiny_cpu_eagle.py; the model section and data mixture are always the target's.
"""

import dataclasses
import pathlib
import sys
import threading

from absl import flags

from mct.cli.train import entry_for
from mct.config.posttrain import EagleRunConfig
from mct.posttrain.eagle import train_eagle

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "experiments/configs/tiny_cpu_eagle.py"


def train_for_target(config: EagleRunConfig, stop: threading.Event | None = None) -> dict:
    """train_eagle with --target (when given) as eagle.target."""
    target = flags.FLAGS.target or config.eagle.target
    return train_eagle(config.replace(eagle=dataclasses.replace(config.eagle, target=target)), stop=stop)


def entry() -> None:
    flags.DEFINE_string("target", "", "The target run's workdir (the head drafts for it).")
    if not any(arg == "--config" or arg.startswith("--config=") for arg in sys.argv[1:]):
        sys.argv[1:1] = [f"--config={DEFAULT_CONFIG}"]
    entry_for(train_for_target, EagleRunConfig)()


if __name__ == "__main__":
    entry()
