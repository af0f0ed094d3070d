"""Parallelism (layer 2): the device mesh and the logical-axis rules (`sharding`), and joining a multi-process
job, global batches and agreed stops (`distributed`). Imports `mct.config` and `mct.errors` only.
"""
