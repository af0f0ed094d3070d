"""MiniCPM4-0.5B pre-training (stable phase): 24 x 1024, 16 q / 2 kv heads, tied embeddings.

Point data.mixture at prepared shard directories (python -m data_pipelines.prepare) before running.
"""

from experiments.configs.base import base_config, model_config
from experiments.configs.mixtures import pretrain_mixture


def get_config():
    c = base_config()
    c.workdir = "/tmp/mct-minicpm4-0p5b"
    c.model = model_config(
        n_layers=24, d_model=1024, n_heads=16, n_kv_heads=2, head_dim=64, d_mlp=4096, vocab_size=73448
    )
    c.model.rms_eps = 1e-5
    c.model.tie_embeddings = True
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "dots_with_no_batch_dims_saveable"
    c.model.loss_chunk = 1024
    c.data.vocab_size = 73448
    c.data.seq_len = 4096
    c.data.mixture = pretrain_mixture()
    c.train.steps = 250_000
    c.train.batch_size = 512  # 2M tokens per step
    c.optimizer.lr = 0.01
    c.schedule.warmup_fraction = 0.008  # 2000 of 250K steps
    c.schedule.decay_fraction = 0.1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every_steps = 1000
    c.eval.every_steps = 1000
    return c
