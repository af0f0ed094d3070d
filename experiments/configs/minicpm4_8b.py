"""MiniCPM4-8B pre-training (stable phase): the released model's shape and fields (openbmb/MiniCPM4-8B's
config.json): 32 x 4096, 32 q / 2 kv heads, MLP 16384, vocabulary 73,448, untied embeddings, RMSNorm eps 1e-6,
scale_emb 12, dim_model_base 256, scale_depth 1.4, default RoPE over 32,768 positions, and InfLLM v2 as its
sparse_config (kernel 32 / stride 16, blocks of 64, 1 initial block, a 2048-token window, top-64 beside it,
dense below 8192 tokens).

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
    c.model.max_position = 32768
    c.model.scale_emb, c.model.dim_model_base, c.model.scale_depth = 12.0, 256, 1.4
    c.model.attention = "infllm_v2"  # dense below sparse.dense_len: all of the 4K stable phase
    c.model.sparse.implementation = "pallas_tpu"  # "pallas_gpu" on GPUs, "xla" anywhere
    sparse = dict(
        kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, window_size=2048, dense_len=8192
    )
    c.model.sparse.update(sparse)
    c.model.sparse.topk = (
        64 + 2048 // 64
    )  # mct counts the window's 32 blocks inside topk; OpenBMB's topk 64 beside them
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.loss_chunk = 1024
    c.data.vocab_size = 73448
    c.data.seq_len = 4096
    c.data.mixture = pretrain_mixture()
    c.train.steps = 1_000_000
    c.train.batch_size = 2048  # 8M tokens per step
    # fits v5p-128 (fsdp 32 x tensor 2) with remat full: 54.48 GiB of 95 per chip; 1 needs 108.51 (mct.aot,
    # libtpu 0.0.42.1)
    c.train.grad_accum = 2
    c.data.num_logical_shards = 64  # a multiple of the hosts: 16 on v5p-128, 64 on v5p-512
    c.optimizer.lr = 7e-3
    c.schedule.warmup_fraction = 0.002  # 2000 of 1M steps
    c.schedule.decay_fraction = 0.1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 2  # kv_heads = 2 caps the tensor axis at 2
    c.checkpoint.every_steps = 1000
    c.eval.every_steps = 1000
    return c
