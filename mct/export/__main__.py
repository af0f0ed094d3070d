"""`python -m mct.export`: a shim; mct/cli/export.py is the entry point (its docstring is the usage)."""

from mct.cli import export

__doc__ = export.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    export.entry()
