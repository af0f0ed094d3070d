"""MiniCPM4-0.5B long-context stage: 4K -> 32K with InfLLM v2 sparse attention and LongRoPE.

Starts from a stable-phase checkpoint of minicpm4_0p5b (a branch: --config.schedule.branch_from=WORKDIR
--config.schedule.branch_step=N) on the long-context length-bucket mixture.
"""

from experiments.configs import minicpm4_0p5b
from experiments.configs.mixtures import long_context_stage_mixture

ORIGINAL_CONTEXT = 4096
CONTEXT = 32768


def longrope_factors(head_dim: int, scale: float) -> tuple[float, ...]:
    """Per-frequency factors rising from 1 (fast, local frequencies kept) to `scale` (slow ones stretched).

    A smooth default; replace with factors searched for the released checkpoint when fine-tuning one.
    """
    half = head_dim // 2
    return tuple(1.0 + (scale - 1.0) * (i / (half - 1)) ** 2 for i in range(half))


def get_config():
    c = minicpm4_0p5b.get_config()
    c.workdir = "/tmp/mct-minicpm4-0p5b-longctx"
    c.model.attention = "infllm_v2"
    c.model.sparse.implementation = "pallas_tpu"  # "pallas_gpu" on GPUs, "xla" anywhere
    c.model.max_position = CONTEXT
    c.model.rope.type = "longrope"
    c.model.rope.original_max_position = ORIGINAL_CONTEXT
    c.model.rope.short_factor = tuple(1.0 for _ in range(c.model.head_dim // 2))
    c.model.rope.long_factor = longrope_factors(c.model.head_dim, CONTEXT / ORIGINAL_CONTEXT)
    c.model.remat = "full"
    c.data.seq_len = CONTEXT
    c.data.mixture = long_context_stage_mixture(max_tokens=CONTEXT)
    c.data.packing_bins = 4  # 32K rows: keep the packer's memory bounded
    c.train.batch_size = 64  # 2M tokens per step
    c.train.steps = 10_000
    c.optimizer.lr = 0.005
    c.schedule.warmup_fraction = 0.02
    c.schedule.decay_fraction = 0.1
    return c
