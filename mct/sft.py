"""`python -m mct.sft`: a shim; mct/cli/sft.py is the entry point (its docstring is the usage)."""

from mct.cli import sft

__doc__ = sft.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    sft.entry()
