"""`python -m mct.launch`: start mct.train on local processes, a TPU slice or SLURM.

A shim: mct/cli/launch.py is the entry point."""

from mct.cli import launch

if __name__ == "__main__":
    launch.entry()
