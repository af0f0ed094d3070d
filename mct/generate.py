"""`python -m mct.generate`: a shim; mct/cli/generate.py is the entry point (its docstring is the usage)."""

from mct.cli import generate

__doc__ = generate.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    generate.entry()
