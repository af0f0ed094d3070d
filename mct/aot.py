"""`python -m mct.aot`: a shim; mct/cli/aot.py is the entry point (its docstring is the usage)."""

from mct.cli import aot

__doc__ = aot.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    aot.entry()
