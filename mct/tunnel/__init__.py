"""ModelTunnel v2 (layer 7): sweeps (Optuna), scaling-law fits, reports, the coord check and data verification
by annealing. Imports `mct.run` and the layers below; not `mct.posttrain` or `mct.cli`.
`python -m mct.tunnel` runs `mct.cli.tunnel`.
"""
