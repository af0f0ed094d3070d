"""Jobs (layer 6): local / TPU VM / SLURM launchers (`jobs`) and the ahead-of-time TPU compile of a train step
(`aot`: bytes per device, fit, FLOPs). Imports `mct.run` and the layers below; not `mct.infer`, `mct.export`
or anything above. `python -m mct.launch` runs `mct.cli.launch`.
"""
