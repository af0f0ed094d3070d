"""muP learning-rate transfer up the width axis (MiniCPM paper section 3.1; docs/tunnel_study.md, study 1).

Widths 32-256 against dim_model_base 64, so the width multiplier m runs 0.5, 1, 2, 4: the regime m > 1 that
MiniCPM's claim is about. 2 layers, head_dim 16, 2M tokens a trial (488 steps of 16 x 256) on the default corpus,
WSD with 10% warmup and 10% exponential decay. lr on sqrt(2) steps, 7 points a width: under muP around one centre
for every width; under standard parametrization (SP, same as muP at m = 1) around centre / m, where SP's optimum
is expected to move. Then a second seed at the best three lrs of every column (the seed spread).

python -m mct.tunnel sweep --config experiments/tunnel/mup_width.py
"""

import pathlib

from mct.tunnel.sweep import default_study

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
WIDTHS, BASE_WIDTH, CENTRE_LR = (32, 64, 128, 256), 64, 0.01


def lr_grid(centre: float, points: int = 7) -> list[float]:
    """`points` lrs on sqrt(2) steps centred on `centre` (4 significant digits)."""
    half = points // 2
    return [float(f"{centre * 2 ** (k / 2):.4g}") for k in range(-half, half + 1)]


def get_config():
    c = default_study()
    c.name = "mup_width"
    c.workdir = "/tmp/mct-tunnel/mup_width"
    c.storage = f"sqlite:///{RESULTS / 'mup_width.db'}"
    c.n_layers = 2
    c.head_dim = 16
    c.grids = [{"parametrization": ["mup"], "width": list(WIDTHS), "lr": lr_grid(CENTRE_LR)}] + [
        {"parametrization": ["sp"], "width": [w], "lr": lr_grid(CENTRE_LR * BASE_WIDTH / w)}
        for w in WIDTHS
        if w != BASE_WIDTH
    ]
    c.repeat_top = 3
    c.repeat_seeds = (1,)
    c.tokens = 2_000_000
    c.warmup_frac = 0.1
    c.decay_frac = 0.1
    c.metric = "eval_loss"
    c.scalingbench = ""
    c.overrides = {
        "data": {"seq_len": 256, "eval_batches": 16},
        "model": {"dim_model_base": BASE_WIDTH},
        "train": {"batch_size": 16},
    }
    return c
