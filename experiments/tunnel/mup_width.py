"""Study 1, muP learning-rate transfer up the width axis (MiniCPM paper section 3.1; docs/tunnel_study.md).

Widths 32-256 against dim_model_base 64, so the width multiplier m runs 0.5, 1, 2, 4: the regime m > 1 that
MiniCPM's claim is about. 2M tokens a trial (488 steps). lr on sqrt(2) steps, 7 points a width: under muP
around one centre for every width; under standard parametrization (SP, the same model as muP at m = 1) around
centre / m, where SP's optimum is expected to move. SP's width-256 optimum lay above its grid's top (0.0071),
so that column goes on for two more sqrt(2) steps. Then a second seed at the best three lrs of every column.

python -m mct.tunnel sweep --config experiments/tunnel/mup_width.py
"""

from experiments.tunnel.study_base import BASE_WIDTH, base_study, lr_grid

WIDTHS, CENTRE_LR = (32, 64, 128, 256), 0.01
SP_EXTENSION = {256: [0.01, 0.01414]}  # lrs above the 7 centred on CENTRE_LR / m, where the optimum lay


def get_config():
    c = base_study("mup_width", "mup_width.db")
    sp_lrs = lambda w: lr_grid(CENTRE_LR * BASE_WIDTH / w) + SP_EXTENSION.get(w, [])
    c.grids = [{"parametrization": ["mup"], "width": list(WIDTHS), "lr": lr_grid(CENTRE_LR)}] + [
        {"parametrization": ["sp"], "width": [w], "lr": sp_lrs(w)} for w in WIDTHS if w != BASE_WIDTH
    ]
    c.repeat_top = 3
    c.repeat_seeds = (1,)
    c.tokens = 2_000_000
    return c
