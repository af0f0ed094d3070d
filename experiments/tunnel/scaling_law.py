"""Study 3, a scaling law that predicts (MiniCPM paper section 3; docs/tunnel_study.md).

Five sizes (widths 64-256, 0.36M-2.6M matmul parameters with the tied head) x four token budgets (0.5M-4M, as
10% decay branches of one stable run per size) give the L(N, D) fit. `get_config("holdout")` is the held-out
run: width 512 (8.1M) to 5M tokens, 4x the largest N x D in the fit, trained as one plain WSD run.

python -m mct.tunnel sweep --config experiments/tunnel/scaling_law.py
python -m mct.tunnel sweep --config experiments/tunnel/scaling_law.py:holdout
"""

from experiments.tunnel.study_base import base_study

BUDGETS = (500_000, 1_000_000, 2_000_000, 4_000_000)


def get_config(arg: str = ""):
    if arg == "holdout":
        c = base_study("scaling_holdout", "scaling.db")
        c.grids = [{"width": [512], "tokens": [5_000_000]}]
    else:
        c = base_study("scaling_law", "scaling.db")
        c.grids = [{"width": [64, 96, 128, 192, 256], "decay_tokens": [list(BUDGETS)]}]
    c.warmup_steps = 24  # 20% of the first branch's start, the same for every run and the held-out one
    return c
