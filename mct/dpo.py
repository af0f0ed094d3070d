"""`python -m mct.dpo`: a shim; mct/cli/dpo.py is the entry point (its docstring is the usage)."""

from mct.cli import dpo

__doc__ = dpo.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    dpo.entry()
