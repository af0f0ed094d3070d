"""`python -m mct.import_hf`: a shim; mct/cli/import_hf.py is the entry point (its docstring is the usage)."""

from mct.cli import import_hf

__doc__ = import_hf.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    import_hf.entry()
