"""lm-evaluation-harness's command line with mct's model registered: the arguments are lm-eval's.

    python -m mct.lm_eval --model mct --model_args workdir=DIR[,step=N,chat=True] --tasks NAMES
        [--include_path DIR_OF_TASK_YAMLS] [--batch_size auto|ROWS] [--output_path OUT] ...

`--model mct` is mct.evaluation.lm_eval_model (mct.eval's scoring). lm-eval (0.4.13) finds models from outside
its tree only once they are imported, so this entry imports the model and then runs `lm_eval` itself; from
Python, `import mct.evaluation.lm_eval_model` before `lm_eval.simple_evaluate(model="mct", ...)`. Without
lm-eval installed (the `eval` extra) it prints one line naming the extra and exits 2.
"""

import sys

from mct.cli import common as cli
from mct.errors import UserError

LM_EVAL = "lm-eval==0.4.13"  # requirements.txt's pin of the eval extra


def main(argv: list[str]) -> None:
    del argv  # lm-eval's parser reads sys.argv
    try:
        import lm_eval.__main__ as harness
        import lm_eval.models  # noqa: F401  lm-eval's own models, registered before mct's (its lazy registry)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise  # lm-eval is there but broken: its traceback says how
        raise UserError(
            f"lm-eval is not installed: install mct's eval extra, pip install 'mct[eval]' ({LM_EVAL})"
        ) from None
    import mct.evaluation.lm_eval_model  # noqa: F401  registers the model `mct`

    harness.cli_evaluate()


def entry() -> None:
    cli.guarded(main, sys.argv)


if __name__ == "__main__":
    entry()
