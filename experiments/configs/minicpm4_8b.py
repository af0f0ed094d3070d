"""MiniCPM4-8B pre-training (stable phase): 32 x 4096, 32 q / 2 kv heads, untied embeddings.

Peak lr 7e-3 under muP (hidden matrices get 7e-3 / 16), 2048 x 4096 tokens per batch (the report gives no batch size).
"""

from experiments.configs.base import base_config, model_config
from experiments.configs.mixtures import pretrain_mixture


def get_config():
    c = base_config()
    c.workdir = "/tmp/mct-minicpm4-8b"
    c.model = model_config(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=2, head_dim=128, d_mlp=16384, vocab_size=73448
    )
    c.model.rms_eps = 1e-6
    c.model.tie_embeddings = False
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.loss_chunk = 1024
    c.data.vocab_size = 73448
    c.data.seq_len = 4096
    c.data.mixture = pretrain_mixture()
    c.train.steps = 1_000_000
    c.train.batch_size = 2048  # 8M tokens per step
    c.train.grad_accum = 2  # fits v5p-128 with remat full: 71.5 GiB of 95 per chip (mct.aot); 1 needs 97.7
    c.data.num_logical_shards = 64  # a multiple of the hosts: 16 on v5p-128, 64 on v5p-512
    c.optimizer.lr = 7e-3
    c.schedule.warmup_fraction = 0.002  # 2000 of 1M steps
    c.schedule.decay_fraction = 0.1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 2  # kv_heads = 2 caps the tensor axis at 2
    c.checkpoint.every_steps = 1000
    c.eval.every_steps = 1000
    return c
