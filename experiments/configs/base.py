"""Defaults shared by every training config; experiment files override fields of `base_config()`.

Every key a run may set exists here, so a mistyped `--config.x.y=...` override fails loudly.
"""

import ml_collections

from data_pipelines.config import default_data_config


def model_config(
    *, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_mlp: int, vocab_size: int
) -> ml_collections.ConfigDict:
    """A MiniCPM model with muP; only the shape varies between experiments."""
    return ml_collections.ConfigDict(
        dict(
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            d_mlp=d_mlp,
            vocab_size=vocab_size,
            tie_embeddings=True,
            rms_eps=1e-5,
            max_position=32768,
            # muP (DESIGN.md section 2). parametrization "sp" turns the width multiplier off (coord checks).
            parametrization="mup",
            scale_emb=12.0,
            scale_depth=1.4,
            dim_model_base=256,
            init_std=0.1,
            # RoPE: type "default" or "longrope" (per-frequency factors, short list below original_max_position).
            rope=dict(
                theta=10000.0,
                type="default",
                original_max_position=32768,
                short_factor=(),  # one factor per frequency (head_dim // 2); () = all 1
                long_factor=(),
            ),
            # Attention dispatch (mct/attention.py): "blockwise" (flash-style XLA), "naive" (materialised
            # scores), "infllm_v2" (trainable sparse; dense below sparse.dense_len).
            attention="blockwise",
            attention_block=128,  # blockwise attention tile (128 measured fastest at seq 1024 on CPU)
            sparse=dict(
                block_size=64,
                kernel_size=32,
                kernel_stride=16,
                init_blocks=1,
                window_size=2048,
                topk=96,
                dense_len=8192,
                lse_approx=True,
                use_nope=False,
                implementation="xla",
            ),
            compute_dtype="auto",  # auto: bfloat16 on GPU/TPU, float32 on CPU; params stay float32
            scan_layers=True,  # lax.scan over the stacked layers (False: unrolled, slower compile)
            remat="none",  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
            loss_chunk=0,  # tokens per cross-entropy chunk (0 = whole sequence at once)
        )
    )


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = ""
    c.seed = 0
    c.model = model_config(
        n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=160, vocab_size=1024
    )
    c.data = default_data_config()
    c.train = dict(
        steps=100,
        batch_size=8,  # global, in sequences
        grad_accum=1,  # micro-batches per step; batch_size must divide evenly
        log_every_steps=10,
        max_consecutive_nonfinite=5,
    )
    c.optimizer = dict(
        lr=0.01,  # peak lr (muP: hidden matrices get lr / m)
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        decay_embeddings=False,
        grad_clip=1.0,
    )
    c.schedule = dict(
        warmup_steps=10,
        decay_steps=10,  # the decay phase is the last decay_steps of train.steps
        decay_shape="exponential",  # exponential | linear | cosine | 1-sqrt
        half_life=0,  # exponential decay half-life in steps (0 -> decay_steps / 5)
        lr_min=0.0,
        branch_from="",  # workdir of a stable run to branch a decay from
        branch_step=-1,  # its checkpoint step; the branch decays over the next decay_steps
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.checkpoint = dict(every_steps=50, max_to_keep=3, async_save=True)
    # batches per eval: data.eval_batches; scalingbench: "" (off), "default" (embedded) or a JSONL path
    c.eval = dict(every_steps=50, scalingbench="")
    return c
