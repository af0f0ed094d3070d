"""`python -m mct.dpo`: direct preference optimisation. A shim: mct/cli/dpo.py is the entry point."""

from mct.cli import dpo

if __name__ == "__main__":
    dpo.entry()
