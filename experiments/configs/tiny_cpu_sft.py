"""SFT of a tiny_cpu run on chat data (the embedded generated conversations by default): the README's
pretrain -> sft -> dpo chain. Pass --config.init_from=PRETRAIN_WORKDIR (its model shape must match)."""

from experiments.configs import tiny_cpu


def get_config():
    c = tiny_cpu.get_config()
    c.workdir = "/tmp/mct-tiny-sft"
    c.init_from = "/tmp/mct-tiny"
    c.data.chat.path = ("default",)
    c.train.steps = 100
    c.schedule.lr_from_init = True  # MiniCPM: SFT continues from the pre-training run's final lr
    c.schedule.warmup_steps = 0
    c.schedule.decay_fraction = 0.2
    c.eval.every_steps = 50
    c.checkpoint.every_steps = 50
    return c
