"""What the wind-tunnel study's three parts share (docs/tunnel_study.md): the proxy shape, the data, the
schedule, and where results live. 2 layers, head_dim 16, dim_model_base 64 (width 64 is m = 1), batches of
16 x 256 tokens of the default corpus, WSD with 10% warmup and 10% exponential decay, one eval at the end on
16 held-out batches. The Optuna databases are committed under results/, so a study resumes in a new sitting
(the trial running when a sitting ended restarts; the others are done)."""

import pathlib

import ml_collections

from mct.tunnel.sweep import default_study

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TINY_CPU = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.py"  # the proxies' base
BASE_WIDTH = 64
MUP_LR = 0.01  # the muP optimum of study 1 (mup_width), used by the schedule and scaling studies


def base_study(name: str, database: str) -> ml_collections.ConfigDict:
    """A grid study `name` on the shared proxy shape, stored in results/`database`."""
    c = default_study()
    c.name = name
    c.base_config = str(TINY_CPU)
    c.workdir = f"/tmp/mct-tunnel/{name}"
    c.storage = f"sqlite:///{RESULTS / database}"
    c.n_layers = 2
    c.head_dim = 16
    c.warmup_frac = 0.1  # studies of runs with different lengths set one warmup_steps instead
    c.decay_frac = 0.1
    c.metric = "eval_loss"
    c.scalingbench = ""
    c.space = {"lr": [MUP_LR]}
    c.overrides = {
        "data": {"seq_len": 256, "eval_batches": 16},
        "model": {"dim_model_base": BASE_WIDTH},
        "train": {"batch_size": 16},
    }
    return c


def lr_grid(centre: float, points: int = 7) -> list[float]:
    """`points` lrs on sqrt(2) steps centred on `centre` (4 significant digits)."""
    half = points // 2
    return [float(f"{centre * 2 ** (k / 2):.4g}") for k in range(-half, half + 1)]
