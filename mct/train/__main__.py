"""`python -m mct.train`: a shim; mct/cli/train.py is the entry point (its docstring is the usage)."""

from mct.cli import train

__doc__ = train.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    train.entry()
