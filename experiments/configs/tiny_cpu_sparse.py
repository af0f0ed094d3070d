"""Tiny MiniCPM trained with InfLLM v2 sparse attention on CPU, at a length where it is really sparse.

seq 1024, blocks of 16 tokens: each query sees 12 of up to 64 blocks (1 initial + 4 selected + 7 local).
"""

from experiments.configs import tiny_cpu


def get_config():
    c = tiny_cpu.get_config()
    c.workdir = "/tmp/mct-tiny-sparse"
    c.model.attention = "infllm_v2"
    c.model.sparse.update(
        dict(
            block_size=16,
            kernel_size=16,
            kernel_stride=8,
            init_blocks=1,
            window_size=112,
            topk=12,
            dense_len=512,
            implementation="xla",
        )
    )
    c.model.max_position = 4096
    c.data.seq_len = 1024
    c.train.batch_size = 4
    c.train.steps = 100
    return c
