"""Data verification by annealing (MiniCPM4 report section 2.2.1): two decay branches from one stable-phase
checkpoint, the run's own mixture vs (1 - share) of it plus `share` of a candidate dataset, compared on the
same held-out eval set (the run's mixture's eval split) and on ScalingBench. A cheap anneal in place of a
full run decides whether candidate data helps.

    python -m mct.tunnel verify_data --from WORKDIR --step N --candidate DIR --share 0.3 --decay_steps K

Branches run with mct.run.training_run (schedule.branch_from / branch_step, MiniCPM paper section 4.2) into
OUT/default and OUT/candidate (OUT: --out, default WORKDIR/verify_data-N); a finished branch is not rerun.
OUT gets report.md and losses.png.
"""

import dataclasses
import json
import pathlib

from data_pipelines.config import MixtureComponent
from mct.config.run import Config
from mct.errors import ConfigError
from mct.run.checkpoint import Checkpointer
from mct.run.training_run import RunData, make_eval_sets, train
from mct.train.trainer import TrainSetup

CANDIDATE = "verify_candidate"
METRICS = ("eval_loss", "scalingbench_loss")


class _SameEvalData(RunData):
    """Pre-training data whose eval sets come from `eval_data` (the source run's), whatever the mixture."""

    def __init__(self, eval_data):
        self._eval_data = eval_data

    def eval_sets(self, setup: TrainSetup) -> dict[str, list]:
        return make_eval_sets(dataclasses.replace(setup, config=setup.config.replace(data=self._eval_data)))


def branch_configs(
    source: str, step: int, candidate: str, share: float, decay_steps: int, out: pathlib.Path
) -> dict[str, Config]:
    """The two branches' configs: the source run's config at `step`, decaying over `decay_steps`."""
    if not 0.0 < share < 1.0:
        raise ConfigError(f"--share must be in (0, 1), got {share}")
    if decay_steps < 1:
        raise ConfigError(f"--decay_steps must be >= 1, got {decay_steps}")
    if not pathlib.Path(candidate).is_dir():
        raise ConfigError(f"--candidate {candidate} is not a prepared dataset directory")
    checkpoints = Checkpointer(source, read_only=True)
    try:
        if step not in checkpoints.all_steps():
            raise ConfigError(f"--step {step}: no checkpoint in {source} (have {checkpoints.all_steps()})")
        base = Config.from_saved(checkpoints.read_meta(step)["config"])
    finally:
        checkpoints.close()
    mixture = base.data.mixture
    total = sum(c.weight for c in mixture.values())
    mixed = {
        name: dataclasses.replace(c, weight=c.weight / total * (1 - share)) for name, c in mixture.items()
    }
    mixed[CANDIDATE] = MixtureComponent(str(candidate), share)
    schedule = dataclasses.replace(
        base.schedule, branch_from=str(source), branch_step=step, decay_steps=decay_steps
    )
    evaluation = dataclasses.replace(base.eval, scalingbench=base.eval.scalingbench or "default")
    return {
        name: base.replace(
            workdir=str(out / name),
            schedule=schedule,
            eval=evaluation,
            data=dataclasses.replace(base.data, mixture=m),
        ).resolve()
        for name, m in (("default", mixture), ("candidate", mixed))
    }


def verify_data(
    source: str,
    step: int,
    candidate: str,
    share: float,
    decay_steps: int,
    out: str | None = None,
    devices: list | None = None,
) -> dict:
    """Runs (or finds finished) both branches on `devices` (default: all); writes report.md and losses.png;
    returns the losses.
    """
    out_dir = pathlib.Path(out or pathlib.Path(source) / f"verify_data-{step}")
    configs = branch_configs(source, step, candidate, share, decay_steps, out_dir)
    eval_data = configs["default"].data
    losses = {}
    for name, config in configs.items():
        result = train(config, devices, data=_SameEvalData(eval_data))
        losses[name] = {m: float(result[m]) for m in METRICS if m in result}
    summary = {
        "source": str(source),
        "step": step,
        "candidate": str(candidate),
        "share": share,
        "decay_steps": decay_steps,
        "losses": losses,
        "difference": {
            m: losses["candidate"][m] - losses["default"][m] for m in METRICS if m in losses["default"]
        },
    }
    _write_report(summary, out_dir)
    return summary


def _write_report(summary: dict, out_dir: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(summary["difference"])
    rows = [
        f"| {m} | {summary['losses']['default'][m]:.4f} | {summary['losses']['candidate'][m]:.4f} | "
        f"{summary['difference'][m]:+.4f} |"
        for m in metrics
    ]
    verdict = (
        "helps" if all(d < 0 for d in summary["difference"].values()) else "does not help on every metric"
    )
    lines = [
        "# Data verification by annealing",
        "",
        f"Decay branches from {summary['source']} step {summary['step']} over {summary['decay_steps']} steps: "
        f"the run's mixture vs {1 - summary['share']:.0%} of it + {summary['share']:.0%} of "
        f"{summary['candidate']}. Lower is better; the candidate {verdict}.",
        "",
        "| metric | default | with candidate | difference |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "![losses](losses.png)",
    ]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.35
    for i, name in enumerate(("default", "candidate")):
        ax.bar(
            [j + i * width for j in range(len(metrics))],
            [summary["losses"][name][m] for m in metrics],
            width,
            label=name,
        )
    ax.set_xticks([j + width / 2 for j in range(len(metrics))], metrics)
    ax.set(ylabel="loss after the decay", title=f"decay branches from step {summary['step']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "losses.png", dpi=120)
    plt.close(fig)
