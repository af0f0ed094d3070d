"""RL with chunk-wise rollout on tiny_cpu's model: the README demo chain's last stage (pretrain -> sft -> rl).

python -m mct.rl --config experiments/configs/tiny_cpu_rl.py --config.init_from=/tmp/mct-tiny-sft
The embedded arithmetic task and the numeric reward; group size 8 and chunks of 8 tokens so that a CPU run
shows both carried trajectories and learning within minutes.
"""

from experiments.configs import tiny_cpu
from experiments.configs.base import for_run
from mct.config.posttrain import RLRunConfig


def get_config():
    c = for_run(tiny_cpu.get_config(), RLRunConfig)
    c.workdir = "/tmp/mct-tiny-rl"
    c.data.seq_len = 64  # training rows: prompt + response
    c.train.steps = 100
    c.train.batch_size = 32  # rows per update (mini-batch)
    c.train.log_every_steps = 1
    c.checkpoint.every_steps = 25
    c.eval.every_steps = 1000
    c.optimizer.lr = 1e-4  # constant (a tiny model moves little at the report's 1e-5 in 100 steps)
    c.schedule.warmup_fraction = 0.0
    c.schedule.decay_fraction = 0.0
    c.rl.reward = "numeric"
    c.rl.group_size = 8
    c.rl.prompts_per_step = 4
    c.rl.chunk_tokens = 8
    c.rl.max_prompt_tokens = 40
    c.rl.max_response_tokens = 24
    c.rl.ref_refresh_steps = 20
    return c
