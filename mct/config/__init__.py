"""The typed config schema (layer 1; only `mct.errors` lies below it): `model` (the decoder's shape and
options), `run` (one training run), `posttrain` (the DPO and RL entry points' run configs), `schema` (dicts
<-> frozen dataclasses). It imports only `mct.errors`, `data_pipelines.config` and the kernels' settings
record; every other package may import it.
"""
