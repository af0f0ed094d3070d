"""BitCPM stage 2 of a tiny_cpu run: ternary quantisation-aware training from its params (MiniCPM4 report,
BitCPM4): fresh optimizer, re-warmed lr with a peak half of stage 1's, ~40% of stage 1's tokens.

    python -m mct.train --config experiments/configs/tiny_cpu_qat.py --config.init_from=/tmp/mct-tiny
"""

from experiments.configs import tiny_cpu


def get_config():
    c = tiny_cpu.get_config()
    stage1 = tiny_cpu.get_config()
    c.workdir = "/tmp/mct-tiny-qat"
    c.init_from = stage1.workdir  # WORKDIR[:STEP]; params only
    c.model.quant.weights = "ternary"
    c.model.quant.group_size = 32  # BitCPM-CANN: 32 beats 64 and per-channel (divides d_model, d_mlp)
    c.optimizer.lr = stage1.optimizer.lr / 2  # BitCPM convention: stage-2 peak about half of stage 1
    c.train.steps = round(0.4 * stage1.train.steps)  # >= 40% of the tokens matches ternary from scratch
    c.schedule.warmup_fraction = 0.1  # re-warmup from the fresh optimizer state
    c.schedule.decay_fraction = 0.2
    c.eval.every_steps = 40
    c.checkpoint.every_steps = 40
    return c
