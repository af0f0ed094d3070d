"""An EAGLE draft head for a tiny_cpu run (mct.eagle; FR-Spec's head): the model section and the data mixture
are the target's, set by --target=WORKDIR; this file sets the head's training."""

from experiments.configs import tiny_cpu
from experiments.configs.base import for_run
from mct.config.posttrain import EagleRunConfig


def get_config():
    c = for_run(tiny_cpu.get_config(), EagleRunConfig)
    c.workdir = "/tmp/mct-tiny-eagle"
    c.eagle.target = "/tmp/mct-tiny"
    c.eagle.feature_weight = 1.0  # EAGLE section 3.2
    c.eagle.token_weight = 0.1
    c.train.steps = 200
    c.optimizer.lr = 3e-3
    c.schedule.warmup_steps = 10
    c.schedule.decay_fraction = 0.2
    c.eval.every_steps = 100
    c.checkpoint.every_steps = 100
    return c
