"""The workdir (layer 5): its lock, orbax checkpoints (the only module that knows their layout), starting from
another run (`init_from`), reading a finished run (`reader`), every run's shell (`training_run`: resume,
branches, data, hooks, final save), ScalingBench eval sets, upcycling and step-0 workdirs written whole.
Imports `mct.train` and the layers below, and `data_pipelines`.
"""
