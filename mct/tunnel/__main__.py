"""Command line for the wind tunnel: `python -m mct.tunnel <command> ...`.

Each command is an entry in COMMANDS: a function that adds its arguments to a subparser and one that runs
it. Bad input (missing file, bad column, too few rows) exits with a one-line error, not a traceback.
"""

import argparse
import csv
import json
import pathlib
import sys
from collections.abc import Callable

import numpy as np

from mct.tunnel import coord_check, fits, report, sweep

_MIN_FIT_ROWS = 6  # L(N, D) has 5 parameters; one more row leaves a degree of freedom for the errors


def _parse_n_d(text: str) -> tuple[float, float]:
    """'N,D' (e.g. '8e9,1e12') -> (N, D)."""
    try:
        n, d = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N,D as two numbers such as 8e9,1e12, got {text!r}"
        ) from None
    if not (n > 0 and d > 0):
        raise argparse.ArgumentTypeError(f"N and D must be positive, got {text!r}")
    return n, d


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


def _add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="CSV with columns N, D, loss")
    parser.add_argument("--predict", type=_parse_n_d, help="N,D at which to predict the loss")
    parser.add_argument("--json", action="store_true", help="end with one JSON object on the last line")


def _run_fit(args: argparse.Namespace) -> None:
    """Fits L(N, D) = C_N N^-alpha + C_D D^-beta + L0 to the CSV and prints the parameters."""
    fit = fits.fit_loss_nd(*read_fit_csv(args.csv))
    result = fit.to_dict()
    if args.predict is not None:
        mean, std = fit.predict(*args.predict)
        result |= {"prediction": float(mean), "prediction_std": float(std)}
    if args.json:
        print(json.dumps(result))
        return
    for name, value in fit.params.items():
        print(f"{name:>6} = {value:.6g} +- {fit.stderr[name]:.2g}")
    print(f"rmse {fit.rmse:.4g}, max relative error {fit.max_rel_err:.3%}")
    if args.predict is not None:
        n, d = args.predict
        print(f"L(N={n:.3g}, D={d:.3g}) = {result['prediction']:.4f} +- {result['prediction_std']:.4f}")


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--records", help="JSONL file of trial records")
    source.add_argument("--study", help="Optuna study name (with --storage)")
    parser.add_argument("--storage", help="Optuna storage URL of --study, e.g. sqlite:///WORKDIR/study.db")
    parser.add_argument("--out", required=True, help="directory for trials.md/csv, plots and fits.json")
    parser.add_argument("--predict", type=_parse_n_d, help="N,D at which fits.json predicts the loss")
    parser.add_argument("--metric", default="eval_loss", choices=report.METRICS, help="loss to plot and fit")
    parser.add_argument("--json", action="store_true", help="end with one JSON object on the last line")


def _run_report(args: argparse.Namespace) -> None:
    """Writes the sweep report for the records file."""
    if args.study and not args.storage:
        raise ValueError("--study needs --storage")
    trials = sweep.records(args.study, args.storage) if args.study else report.load_records(args.records)
    written = report.write_report(trials, args.out, predict=args.predict, metric=args.metric)
    if args.json:
        print(json.dumps(written))
        return
    for path in [written["markdown"], written["csv"], written["fits_json"], *written["plots"]]:
        print(path)
    for name, reason in written["fits"]["skipped"].items():
        print(f"skipped {name}: {reason}")


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="study file, e.g. experiments/tunnel/lr_transfer.py")
    parser.add_argument("--workers", type=int, default=1, help="trials at once, as separate local processes")


def _run_sweep(args: argparse.Namespace) -> None:
    """Runs (or resumes) the study until it has all its trials, then prints its table."""
    study = sweep.load_study_config(args.config)
    sweep.sweep(study, workers=args.workers)
    print(f"study {study.name!r}: {sweep.storage_url(study)}")
    for r in sweep.records(study.name, sweep.storage_url(study)):
        print(r["trial"], r["state"], r["params"], r.get(study.metric))


def _add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--storage", required=True, help="Optuna storage URL shared by the workers")


def _run_worker(args: argparse.Namespace) -> None:
    """Takes trials of an existing study (possibly from another machine) until it is complete."""
    sweep.work(sweep.study_from_storage(args.study, args.storage), args.storage)


def _add_coord_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="coord_check.png", help="PNG to write")
    parser.add_argument("--widths", default="64,128,256,512", help="comma-separated d_model values")
    parser.add_argument("--steps", type=int, default=5, help="AdamW steps before measuring")


def _run_coord_check(args: argparse.Namespace) -> None:
    """Activation scales per layer across widths, muP vs standard parametrization, as a PNG."""
    widths = tuple(int(w) for w in args.widths.split(","))
    result = coord_check.coord_check(widths, steps=args.steps)
    print(coord_check.plot_coord_check(result, args.out))
    print(json.dumps(result))


# name -> (add arguments, run, help).
COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None], str]
] = {
    "fit": (_add_fit_arguments, _run_fit, "fit L(N, D) to a CSV of N, D, loss"),
    "report": (_add_report_arguments, _run_report, "tables, plots and fits for a sweep's trial records"),
    "sweep": (_add_sweep_arguments, _run_sweep, "run or resume a wind-tunnel study"),
    "worker": (_add_worker_arguments, _run_worker, "take trials of a shared study"),
    "coord_check": (_add_coord_check_arguments, _run_coord_check, "muP coordinate check plot"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mct.tunnel", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    except (OSError, ValueError) as e:
        sys.exit(f"python -m mct.tunnel {args.command}: error: {e}")


def entry() -> None:
    main()


if __name__ == "__main__":
    entry()
