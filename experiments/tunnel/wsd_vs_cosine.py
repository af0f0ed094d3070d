"""Study 2, WSD vs cosine and decay branches (MiniCPM paper section 4; docs/tunnel_study.md).

At width 128 (m = 2) and the muP lr of study 1, to T = 4M tokens: cosine from the end of warmup to 0 at T/4,
T/2 and T (three full runs); WSD to T with 2.5%, 10% and 20% exponential decay; and one stable run with 10%
decay branches at T/4, T/2 and T, which gives the loss-vs-tokens curve that cosine needs the three runs for.
Every run warms up for the same 24 steps.

python -m mct.tunnel sweep --config experiments/tunnel/wsd_vs_cosine.py
"""

from experiments.tunnel.study_base import base_study

T = 4_000_000


def get_config():
    c = base_study("wsd_vs_cosine", "wsd_vs_cosine.db")
    c.width = 128
    c.tokens = T
    c.warmup_steps = 24  # 10% of the shortest run, the same for every run
    c.grids = [
        {"decay_shape": ["cosine"], "decay_frac": [1.0], "tokens": [T // 4, T // 2, T]},
        {"decay_shape": ["exponential"], "decay_frac": [0.025, 0.1, 0.2]},
        {"decay_shape": ["exponential"], "decay_tokens": [[T // 4, T // 2, T]]},
    ]
    return c
