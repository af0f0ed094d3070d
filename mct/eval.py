"""`python -m mct.eval`: a shim; mct/cli/eval.py is the entry point (its docstring is the usage)."""

from mct.cli import eval as eval_cli

__doc__ = eval_cli.__doc__  # absl prints the __main__ module's docstring as the usage

if __name__ == "__main__":
    eval_cli.entry()
