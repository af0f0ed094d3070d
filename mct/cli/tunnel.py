"""Command line for the wind tunnel: python -m mct.tunnel COMMAND [flags]

commands:
  fit          --csv FILE [--predict N,D] [--json]
               fit L(N, D) to a CSV of N, D, loss
  report       (--records FILE | --study NAME --storage URL [--holdout_study NAME]) --out DIR [--predict N,D]
               [--metric M] [--json]
               tables, plots and fits for a sweep's trial records (L(N, D), and accuracy = sigmoid(ScalingBench loss))
  sweep        --config FILE [--workers K]
               run or resume a wind-tunnel study
  worker       --study NAME --storage URL
               take trials of a shared study
  coord_check  [--out PNG] [--widths 64,128,256,512] [--steps S]
               muP coordinate check plot
  verify_data  --from WORKDIR --step N --candidate DIR [--share 0.3] [--decay_steps K] [--out DIR] [--json]
               decay branches with and without candidate data, compared on eval and ScalingBench loss

A flag of another command is an error. Bad input (a missing file, bad column, too few rows, a wrong flag)
prints one line `error: ...` and exits 2. Each command's flags and what it needs are in COMMANDS.
"""

import csv
import functools
import json
import pathlib
import sys

import numpy as np
from absl import app, flags

from mct.cli import common as cli
from mct.errors import UserError
from mct.tunnel import coord_check, fits, report, sweep, verify_data

PROG = "mct.tunnel"
F = flags.FLAGS
_MIN_FIT_ROWS = 6  # L(N, D) has 5 parameters; one more row leaves a degree of freedom for the errors


class _PointParser(flags.ArgumentParser):
    """'N,D' (e.g. '8e9,1e12') -> (N, D), both positive."""

    def parse(self, argument: str | tuple[float, float]) -> tuple[float, float]:
        if isinstance(argument, tuple):
            return argument
        try:
            n, d = (float(part) for part in argument.split(","))
        except ValueError:
            raise ValueError("expected N,D as two numbers such as 8e9,1e12") from None
        if not (n > 0 and d > 0):
            raise ValueError("N and D must be positive")
        return n, d

    def flag_type(self) -> str:
        return "N,D"


@functools.cache
def _define_flags() -> None:
    """This CLI's flags, on flags.FLAGS, once per process. Defined when the CLI runs, not on import, as the other
    entry points do: the tests import several of them into one process, and their flag names overlap (--out)."""
    app.define_help_flags()
    flags.DEFINE_string("csv", None, "fit: CSV with columns N, D, loss.")
    flags.DEFINE(
        _PointParser(), "predict", None, "fit, report: N,D (e.g. 8e9,1e12) at which to predict the loss."
    )
    flags.DEFINE_bool("json", False, "fit, report: end with one JSON object on the last line.")
    flags.DEFINE_string("records", None, "report: JSONL file of trial records.")
    flags.DEFINE_string("study", None, "report, worker: Optuna study name.")
    flags.DEFINE_string(
        "storage", None, "report, worker: Optuna storage URL, e.g. sqlite:///WORKDIR/study.db."
    )
    flags.DEFINE_string(
        "out",
        None,
        "report: directory for trials.md/csv, plots and fits.json; coord_check: PNG to write "
        "(default coord_check.png).",
    )
    flags.DEFINE_enum("metric", "eval_loss", report.METRICS, "report: loss to plot and fit.")
    flags.DEFINE_string(
        "holdout_study", None, "report: a study in --storage whose runs are predicted, not fitted."
    )
    flags.DEFINE_string("config", None, "sweep: study file, e.g. experiments/tunnel/lr_transfer.py.")
    flags.DEFINE_integer("workers", 1, "sweep: trials at once, as separate local processes.", lower_bound=1)
    flags.DEFINE_string("widths", "64,128,256,512", "coord_check: comma-separated d_model values.")
    flags.DEFINE_integer("steps", 5, "coord_check: AdamW steps before measuring.", lower_bound=0)
    flags.DEFINE_string("from", None, "verify_data: workdir of the stable run to branch from.")
    flags.DEFINE_integer("step", None, "verify_data: its stable-phase checkpoint step.")
    flags.DEFINE_string("candidate", None, "verify_data: prepared dataset to verify.")
    flags.DEFINE_float("share", 0.3, "verify_data: the candidate's share of the branch's tokens.")
    flags.DEFINE_integer("decay_steps", 100, "verify_data: steps of each decay branch.")


def read_fit_csv(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns N, D, loss of a CSV file as float arrays [rows]; errors name the file, row and column."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"CSV file {path!r} does not exist")
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("N", "D", "loss") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        columns: dict[str, list[float]] = {"N": [], "D": [], "loss": []}
        for row_number, row in enumerate(reader, start=2):  # row 1 is the header
            for name, values in columns.items():
                try:
                    values.append(float(row[name]))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}:{row_number}: column {name!r} is {row[name]!r}, not a number"
                    ) from None
    if len(columns["loss"]) < _MIN_FIT_ROWS:
        raise ValueError(f"{path}: L(N, D) needs at least {_MIN_FIT_ROWS} rows, got {len(columns['loss'])}")
    return tuple(np.array(columns[c]) for c in ("N", "D", "loss"))


def _run_fit() -> None:
    """Fits L(N, D) = C_N N^-alpha + C_D D^-beta + L0 to the CSV and prints the parameters."""
    fit = fits.fit_loss_nd(*read_fit_csv(F.csv))
    result = fit.to_dict()
    if F.predict is not None:
        mean, std = fit.predict(*F.predict)
        result |= {"prediction": float(mean), "prediction_std": float(std)}
    if F.json:
        print(json.dumps(result))
        return
    for name, value in fit.params.items():
        print(f"{name:>6} = {value:.6g} +- {fit.stderr[name]:.2g}")
    print(f"rmse {fit.rmse:.4g}, max relative error {fit.max_rel_err:.3%}")
    if F.predict is not None:
        n, d = F.predict
        print(f"L(N={n:.3g}, D={d:.3g}) = {result['prediction']:.4f} +- {result['prediction_std']:.4f}")


def _run_report() -> None:
    """Writes the sweep report for the records file or the Optuna study."""
    if F.records and F.study:
        raise UserError(f"{PROG} report takes --records or --study, not both")
    if not (F.records or F.study):
        raise UserError(f"{PROG} report needs --records FILE or --study NAME --storage URL")
    if F.study and not F.storage:
        raise UserError("--study needs --storage")
    if F.holdout_study and not F.study:
        raise UserError("--holdout_study needs --study and --storage")
    trials = sweep.records(F.study, F.storage) if F.study else report.load_records(F.records)
    holdout = sweep.records(F.holdout_study, F.storage) if F.holdout_study else []
    written = report.write_report(trials, F.out, predict=F.predict, metric=F.metric, holdout=holdout)
    if F.json:
        print(json.dumps(written))
        return
    for path in [written["markdown"], written["csv"], written["fits_json"], *written["plots"]]:
        print(path)
    for name, reason in written["fits"]["skipped"].items():
        print(f"skipped {name}: {reason}")


def _run_sweep() -> None:
    """Runs (or resumes) the study until it has all its trials, then prints its table."""
    study = sweep.load_study_config(F.config)
    sweep.sweep(study, workers=F.workers)
    print(f"study {study.name!r}: {sweep.storage_url(study)}")
    for r in sweep.records(study.name, sweep.storage_url(study)):
        print(r["trial"], r["state"], r["params"], r.get(study.metric))


def _run_worker() -> None:
    """Takes trials of an existing study (possibly from another machine) until it is complete."""
    sweep.work(sweep.study_from_storage(F.study, F.storage), F.storage)


def _run_coord_check() -> None:
    """Activation scales per layer across widths, muP vs standard parametrization, as a PNG."""
    try:
        widths = tuple(int(w) for w in F.widths.split(","))
    except ValueError:
        raise UserError(f"--widths: expected integers such as 64,128,256, got {F.widths!r}") from None
    result = coord_check.coord_check(widths, steps=F.steps)
    print(coord_check.plot_coord_check(result, F.out or "coord_check.png"))
    print(json.dumps(result))


def _run_verify_data() -> None:
    """Two decay branches from the stable checkpoint (default mixture, and with the candidate); their losses."""
    summary = verify_data.verify_data(F["from"].value, F.step, F.candidate, F.share, F.decay_steps, F.out)
    for metric, difference in summary["difference"].items():
        print(
            f"{metric}: default {summary['losses']['default'][metric]:.4f}, with candidate "
            f"{summary['losses']['candidate'][metric]:.4f} ({difference:+.4f})"
        )
    if F.json:
        print(json.dumps(summary))


COMMANDS: dict[str, cli.Command] = {
    "fit": cli.Command(_run_fit, ("csv",), ("predict", "json"), "fit L(N, D) to a CSV of N, D, loss"),
    "report": cli.Command(
        _run_report,
        ("out",),
        ("records", "study", "storage", "predict", "metric", "holdout_study", "json"),
        "tables, plots and fits for a sweep's trial records",
    ),
    "sweep": cli.Command(_run_sweep, ("config",), ("workers",), "run or resume a wind-tunnel study"),
    "worker": cli.Command(_run_worker, ("study", "storage"), (), "take trials of a shared study"),
    "coord_check": cli.Command(_run_coord_check, (), ("out", "widths", "steps"), "muP coordinate check plot"),
    "verify_data": cli.Command(
        _run_verify_data,
        ("from", "step", "candidate"),
        ("share", "decay_steps", "out", "json"),
        "decay branches with and without candidate data",
    ),
}


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parses argv ([program, ...]) from the flags' defaults, so a process can run the CLI again; returns the
    positional arguments ([program, command]). A malformed flag prints one line `error: ...` and exits 2."""
    _define_flags()
    F.unparse_flags()
    positional = cli.parse_flags(argv)
    if F["verbosity"].using_default_value:  # warnings only, as before absl: a sweep trains in this process,
        F.verbosity = -1  # and orbax and grain log every save at INFO
    return positional


def _run(argv: list[str]) -> None:
    """absl main: runs the command in argv ([program, command]); bad input is one line `error: ...`, exit 2."""
    try:
        command = cli.pick_command(PROG, COMMANDS, argv[1:])
        command.run()
    except (*cli.USER_ERRORS, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """`python -m mct.tunnel` with argv (default sys.argv[1:]): one process may call it again and again."""
    _run(_parse_flags([PROG, *(sys.argv[1:] if argv is None else argv)]))


def entry() -> None:
    app.run(_run, flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
