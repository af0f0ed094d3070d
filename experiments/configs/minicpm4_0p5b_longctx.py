"""MiniCPM4-0.5B long-context stage: sequences of 4K -> 32K with InfLLM v2 sparse attention and the released
LongRoPE factors (minicpm4_0p5b.RELEASED_LONGROPE_FACTORS, from openbmb/MiniCPM4-0.5B's config.json).

Starts from a stable-phase checkpoint of minicpm4_0p5b (a branch: --config.schedule.branch_from=WORKDIR
--config.schedule.branch_step=N) on the long-context length-bucket mixture.
"""

from experiments.configs import minicpm4_0p5b
from experiments.configs.mixtures import long_context_stage_mixture

CONTEXT = minicpm4_0p5b.CONTEXT


def get_config():
    c = minicpm4_0p5b.get_config()
    c.workdir = "/tmp/mct-minicpm4-0p5b-longctx"
    c.model.attention = "infllm_v2"
    c.model.sparse.implementation = "pallas_tpu"  # "pallas_gpu" on GPUs, "xla" anywhere
    c.model.max_position = CONTEXT  # the release's LongRoPE (minicpm4_0p5b) over its whole context
    c.model.remat = "full"
    c.data.seq_len = CONTEXT
    c.data.mixture = long_context_stage_mixture(max_tokens=CONTEXT)
    c.data.packing_bins = 4  # 32K rows: keep the packer's memory bounded
    c.train.batch_size = 64  # 2M tokens per step
    c.train.grad_accum = 1
    c.train.steps = 10_000
    c.optimizer.lr = 0.005
    c.schedule.warmup_fraction = 0.02
    c.schedule.decay_fraction = 0.1
    return c
