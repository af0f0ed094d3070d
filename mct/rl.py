"""`python -m mct.rl`: a shim; mct/cli/rl.py is the entry point (its docstring is the usage)."""

from mct.cli import rl

__doc__ = rl.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    rl.entry()
