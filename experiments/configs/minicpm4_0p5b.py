"""MiniCPM4-0.5B pre-training (stable phase): the released model's shape and fields (openbmb/MiniCPM4-0.5B's
config.json): 24 x 1024, 16 q / 2 kv heads, MLP 4096, vocabulary 73,448, tied embeddings, RMSNorm eps 1e-5,
scale_emb 12, dim_model_base 256, scale_depth 1.4, LongRoPE over 32,768 positions.

Point data.mixture at prepared shard directories (python -m data_pipelines.prepare) before running.
"""

from experiments.configs.base import base_config, model_config
from experiments.configs.mixtures import pretrain_mixture

CONTEXT = 32768  # max_position_embeddings = rope_scaling.original_max_position_embeddings in the release
# rope_scaling.short_factor = long_factor of the release's config.json (head_dim / 2 = 32 per-frequency factors;
# as the original context is the whole context, they divide the frequencies at every length). Read from the
# release's config.json as quoted in OpenBMB's MiniCPM LongRoPE documentation and in ports of MiniCPM4-0.5B.
RELEASED_LONGROPE_FACTORS = (
    1.0004360675811768,
    1.0668443441390991,
    1.1631425619125366,
    1.3025742769241333,
    1.5040205717086792,
    1.7941505908966064,
    2.2101221084594727,
    2.802666664123535,
    3.6389970779418945,
    4.804192543029785,
    6.39855432510376,
    8.527148246765137,
    11.277542114257812,
    14.684998512268066,
    18.69317054748535,
    23.13019371032715,
    27.72362518310547,
    32.1606559753418,
    36.168827056884766,
    39.57627868652344,
    42.32667541503906,
    44.45526885986328,
    46.04962921142578,
    47.21482849121094,
    48.05115509033203,
    48.64370346069336,
    49.05967712402344,
    49.34980392456055,
    49.551246643066406,
    49.69068145751953,
    49.78697967529297,
    49.85338592529297,
)


def get_config():
    c = base_config()
    c.workdir = "/tmp/mct-minicpm4-0p5b"
    c.model = model_config(
        n_layers=24, d_model=1024, n_heads=16, n_kv_heads=2, head_dim=64, d_mlp=4096, vocab_size=73448
    )
    c.model.rms_eps = 1e-5
    c.model.tie_embeddings = True
    c.model.max_position = CONTEXT
    c.model.scale_emb, c.model.dim_model_base, c.model.scale_depth = 12.0, 256, 1.4
    c.model.rope.type = "longrope"
    c.model.rope.original_max_position = CONTEXT
    c.model.rope.short_factor = c.model.rope.long_factor = RELEASED_LONGROPE_FACTORS
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.loss_chunk = 1024
    c.data.vocab_size = 73448
    c.data.seq_len = 4096
    c.data.mixture = pretrain_mixture()
    c.train.steps = 250_000
    c.train.batch_size = 512  # 2M tokens per step
    c.train.grad_accum = (
        4  # fits v5e-8 (fsdp 8) with remat full: 15.13 GiB of 16 per chip (mct.aot, libtpu 0.0.42.1)
    )
    c.optimizer.lr = 0.01
    c.schedule.warmup_fraction = 0.008  # 2000 of 250K steps
    c.schedule.decay_fraction = 0.1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every_steps = 1000
    c.eval.every_steps = 1000
    return c
