"""muP learning-rate transfer (MiniCPM's wind tunnel): widths 64/128/256 x 4 layers, lr on a 7-point log grid,
muP vs standard parametrization, a fixed token budget per trial on the default corpus.

python -m mct.tunnel sweep --config experiments/tunnel/lr_transfer.py
python -m mct.tunnel report --study lr_transfer \
    --storage sqlite:////tmp/mct-tunnel/lr_transfer/study.db --out docs/lr_transfer
"""

from experiments.tunnel.study_base import TINY_CPU
from mct.tunnel.sweep import default_study


def get_config():
    c = default_study()
    c.name = "lr_transfer"
    c.base_config = str(TINY_CPU)
    c.workdir = "/tmp/mct-tunnel/lr_transfer"
    c.n_layers = 4
    c.head_dim = 32
    c.space = {
        "width": [64, 128, 256],
        "lr": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
        "parametrization": ["mup", "sp"],
    }
    c.tokens = 150_000  # 73 steps of 16 x 128 tokens: the 42 trials take about half an hour on 2 CPU cores
    c.metric = "eval_loss"
    c.scalingbench = ""
    c.overrides = {"data": {"seq_len": 128, "eval_batches": 4}, "train": {"batch_size": 16}}
    return c
