"""`python -m mct.lm_eval`: a shim; mct/cli/lm_eval.py is the entry point (its docstring is the usage)."""

from mct.cli import lm_eval as lm_eval_cli

if __name__ == "__main__":
    lm_eval_cli.entry()
