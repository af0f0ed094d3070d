"""`python -m mct.tunnel`: a shim; mct/cli/tunnel.py is the entry point (its docstring is the usage)."""

from mct.cli import tunnel

__doc__ = tunnel.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    tunnel.entry()
