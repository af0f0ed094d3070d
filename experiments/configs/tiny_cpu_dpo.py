"""DPO of a tiny_cpu_sft run on preference pairs (the embedded generated arithmetic pairs by default): the
README's pretrain -> sft -> dpo chain. Pass --config.init_from=SFT_WORKDIR."""

from experiments.configs import tiny_cpu_sft
from experiments.configs.base import for_run
from mct.config.posttrain import DPORunConfig


def get_config():
    c = for_run(tiny_cpu_sft.get_config(), DPORunConfig)
    c.workdir = "/tmp/mct-tiny-dpo"
    c.init_from = "/tmp/mct-tiny-sft"
    c.dpo.path = ("default",)
    c.dpo.beta = 0.1
    c.dpo.sft_weight = 0.5  # OpenBMB's DPO script
    c.train.steps = 50
    c.schedule.lr_from_init = False
    c.optimizer.lr = 1e-3  # MiniCPM-DPO: a small constant-then-cosine lr
    c.schedule.decay_shape = "cosine"
    c.schedule.decay_fraction = 0.5
    c.eval.every_steps = 25
    c.checkpoint.every_steps = 25
    return c
