"""`python -m mct.aot`: compile a train step ahead of time for a TPU topology.

A shim: mct/cli/aot.py is the entry point."""

from mct.cli import aot

if __name__ == "__main__":
    aot.entry()
