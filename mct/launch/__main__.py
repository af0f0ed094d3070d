"""`python -m mct.launch`: a shim; mct/cli/launch.py is the entry point (its docstring is the usage)."""

from mct.cli import launch

__doc__ = launch.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    launch.entry()
