"""`python -m mct.generate`: decode from a run's checkpoint. A shim: mct/cli/generate.py is the entry point."""

from mct.cli import generate

if __name__ == "__main__":
    generate.entry()
