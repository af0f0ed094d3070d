"""`python -m mct.upcycle`: a shim; mct/cli/upcycle.py is the entry point (its docstring is the usage)."""

from mct.cli import upcycle

__doc__ = upcycle.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    upcycle.entry()
