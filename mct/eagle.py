"""`python -m mct.eagle`: a shim; mct/cli/eagle.py is the entry point (its docstring is the usage)."""

from mct.cli import eagle

__doc__ = eagle.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    eagle.entry()
