"""Downstream evaluation of a run's checkpoint (layer 8): generation tasks decoded by the decode loop and
judged by RL's rewards (`generation`), and the evaluator over every task kind, writing results.json and the
per-example samples (`harness`), and lm-evaluation-harness's model `mct` on the same scoring (`lm_eval_model`,
which imports lm-eval: the eval extra); log-likelihood scoring itself is `mct.run.tasks` (training's hook uses
it). Imports `mct.posttrain` (rewards), `mct.infer`, `mct.run` and the layers below, and `data_pipelines`; not
`mct.tunnel` or `mct.cli`. `python -m mct.eval` runs `mct.cli.eval`.
"""
