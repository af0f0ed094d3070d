"""lm-evaluation-harness's command line with mct's model registered: the arguments are lm-eval's.

    python -m mct.lm_eval --model mct --model_args workdir=DIR[,step=N,chat=True] --tasks NAMES
        [--include_path DIR_OF_TASK_YAMLS] [--batch_size auto|ROWS] [--output_path OUT] ...

`--model mct` is mct.evaluation.lm_eval_model (mct.eval's scoring). lm-eval (0.4.13) finds models from outside
its tree only once they are imported, so this entry imports the model and then runs `lm_eval` itself; from
Python, `import mct.evaluation.lm_eval_model` before `lm_eval.simple_evaluate(model="mct", ...)`. Without
lm-eval installed (the `eval` extra) it prints one line naming the extra and exits 2.
"""

import sys

from data_pipelines.extras import import_extra
from mct.cli import common as cli


def main(argv: list[str]) -> None:
    del argv  # lm-eval's parser reads sys.argv
    import_extra("lm_eval", "eval")
    import lm_eval.__main__ as harness
    import lm_eval.models  # noqa: F401  lm-eval's own models, registered before mct's (its lazy registry)

    import mct.evaluation.lm_eval_model  # noqa: F401  registers the model `mct`

    harness.cli_evaluate()


def entry() -> None:
    cli.guarded(main, sys.argv)


if __name__ == "__main__":
    entry()
