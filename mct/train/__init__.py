"""Training (layer 4): the pure step (`step`), `trainer.build` and the `Trainer` loop with hooks (`hooks`),
the optimizer with muP lr groups, the WSD schedule and the metrics writer. Imports the layers below
(`mct.model`, `mct.parallel`, `mct.config`, `mct.errors`); never data preparation, workdirs or entry points.
`python -m mct.train` runs `mct.cli.train` (the `__main__` shim).
"""
