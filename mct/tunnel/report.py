"""Sweep report: a table of trials (markdown + CSV), plots, and the scaling-law fits in fits.json.

A trial record is a dict with `trial`, `params` (the swept values: lr, width or d_model, parametrization,
batch_size (sequences), seq_len, ...; a dotted key such as "optimizer.lr" also counts as "lr"), `n_params`,
`tokens`, `flops`, `train_loss`, `eval_loss`, `scalingbench_loss`, `scalingbench_accuracy` (the mean acc of
ScalingBench's tasks, mct.run.scalingbench_tasks), `wall_s` and `state` in {"complete", "diverged", "failed"}.
Only complete trials enter plots and fits; the others are marked in the table.

ModelTunnel v2's accuracy prediction (MiniCPM4 report, section 4.1): accuracy = sigmoid(ScalingBench loss)
fitted on the sweep's models, each held-out model's accuracy predicted from its ScalingBench loss, and, with
`predict` and metric scalingbench_loss, the accuracy at L(N, D)'s predicted loss.
"""

import csv
import json
import math
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mct.tunnel import fits

STATES = ("complete", "diverged", "failed")
METRICS = ("eval_loss", "train_loss", "scalingbench_loss")
_NUMBER_COLUMNS = (
    "n_params",
    "tokens",
    "flops",
    "train_loss",
    "eval_loss",
    "scalingbench_loss",
    "scalingbench_accuracy",
    "wall_s",
)
_MIN_DISTINCT_SIZES = 3  # distinct N and distinct D needed to separate the two terms of L(N, D)
_MIN_ENVELOPE_POINTS = 4


def load_records(path: str) -> list[dict]:
    """Reads trial records from a JSONL file (one record per line) and checks them."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"records file {path!r} does not exist")
    records = []
    for line_number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
    check_records(records)
    return records


def check_records(records: Sequence[dict]) -> None:
    """Raises ValueError naming the record and field when a record is malformed."""
    if not records:
        raise ValueError("no trial records")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"record {i}: expected an object, got {type(record).__name__}")
        name = f"record {i} (trial {record.get('trial', '?')})"
        for key in ("trial", "params", "state"):
            if key not in record:
                raise ValueError(f"{name}: missing field {key!r}")
        if not isinstance(record["params"], dict):
            raise ValueError(f"{name}: field 'params' must be an object")
        if record["state"] not in STATES:
            raise ValueError(f"{name}: field 'state' is {record['state']!r}, expected one of {STATES}")
        for key in _NUMBER_COLUMNS:
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{name}: field {key!r} must be a number or null, got {value!r}")


def _number(value) -> float | None:
    """The value as a finite float, else None (missing, null, NaN, inf, text)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _param(params: dict, *names: str):
    """The first of `names` in params, also as the last part of a dotted key ("optimizer.lr" for "lr")."""
    for name in names:
        for key, value in params.items():
            if key == name or key.endswith("." + name):
                return value
    return None


def _width(params: dict) -> float | None:
    return _number(_param(params, "width", "d_model"))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(records: Sequence[dict], metric: str) -> tuple[list[str], list[list]]:
    """Header and rows: complete trials by metric first, then diverged and failed ones."""
    param_names = sorted({name for r in records for name in r["params"]})
    header = ["trial", "state", *param_names, *_NUMBER_COLUMNS]

    def order(record: dict) -> tuple:
        value = _number(record.get(metric))
        return (STATES.index(record["state"]), value is None, value or 0.0)

    rows = [
        [
            r["trial"],
            r["state"],
            *(r["params"].get(n) for n in param_names),
            *(r.get(c) for c in _NUMBER_COLUMNS),
        ]
        for r in sorted(records, key=order)
    ]
    return header, rows


def _write_csv(path: pathlib.Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def wall_hours(records: Sequence[dict]) -> float:
    """Training wall time: each trial's whole time where the sweep database gave it (`trial_wall_s`: its stable
    run, branches and evals), else the sum of the runs' own `wall_s`."""
    trials = {r["trial"]: r["trial_wall_s"] for r in records if "trial_wall_s" in r}
    runs = sum(_number(r.get("wall_s")) or 0.0 for r in records if "trial_wall_s" not in r)
    return (sum(trials.values()) + runs) / 3600


def _write_markdown(
    path: pathlib.Path, header: list[str], rows: list[list], metric: str, hours: float
) -> None:
    counts = {s: sum(row[1] == s for row in rows) for s in STATES}
    lines = [
        f"# Sweep report ({metric})",
        "",
        ", ".join(f"{n} {s}" for s, n in counts.items()) + "; diverged and failed trials are in bold. "
        f"Training wall time, all trials: {hours:.2f} h.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [_format(v) for v in row]
        if row[1] != "complete":
            cells[1] = f"**{row[1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _log_x(ax: Axes) -> None:
    """Log x axis labelled at powers of ten only (minor labels overlap on short ranges)."""
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def _lr_groups(records: list[dict], metric: str) -> dict[tuple, dict[str, list[float]]]:
    """(parametrization, the other params except lr and seed) -> the lrs and losses of its trials, seed
    repeats included: one lr curve each."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        lr = _number(_param(r["params"], "lr"))
        if lr is None or lr <= 0:
            continue
        parametrization = str(_param(r["params"], "parametrization") or "mup")
        rest = tuple(
            sorted(
                (k, str(v))
                for k, v in r["params"].items()
                if k.split(".")[-1] not in ("lr", "seed", "parametrization")
            )
        )
        if (parametrization, rest) not in groups:
            width, base = _width(r["params"]), r.get("config", {}).get("model", {}).get("dim_model_base")
            groups[(parametrization, rest)] = {
                "lr": [],
                "loss": [],
                "width": width,
                "m": width / base if width and base else None,
            }
        groups[(parametrization, rest)]["lr"].append(lr)
        groups[(parametrization, rest)]["loss"].append(r[metric])
    return groups


def lr_optima(groups: dict[tuple, dict]) -> list[dict]:
    """Per lr curve (`_lr_groups`) with 3 or more lrs: its parabola optimum (fits.lr_optimum) and the seed
    spread (the largest max - min loss among lrs that ran more than once)."""
    rows = []
    for (parametrization, _), g in groups.items():
        lrs, losses = np.array(g["lr"]), np.array(g["loss"])
        if len(np.unique(lrs)) < 3:
            continue
        spreads = [np.ptp(losses[lrs == lr]) for lr in np.unique(lrs) if np.sum(lrs == lr) > 1]
        optimum = fits.lr_optimum(lrs, losses)
        rows.append(
            {
                "parametrization": parametrization,
                "width": g["width"],
                "m": g["m"],
                "trials": len(lrs),
                "seed_spread": float(max(spreads)) if spreads else None,
                **optimum.to_dict(),
            }
        )
    return sorted(rows, key=lambda r: (r["parametrization"] != "mup", r["parametrization"], r["width"] or 0))


def lr_transfer(groups: dict[tuple, dict], optima: list[dict]) -> list[dict]:
    """Per parametrization: the optimum lr of the narrowest width used at the widest, against the widest
    width's own best (mean loss at the grid lr nearest the transferred one vs the best grid lr's). A
    transferred lr more than half a grid step outside the lrs tried has no measured loss (None), only
    `outside_factor`, how far beyond them it lies (SP's grids follow its own optimum, not the proxy's)."""
    by_width = {(p, g["width"]): g for (p, _), g in groups.items()}
    rows = []
    for parametrization in dict.fromkeys(o["parametrization"] for o in optima):
        mine = [o for o in optima if o["parametrization"] == parametrization and o["width"]]
        if len(mine) < 2:
            continue
        proxy, target = mine[0], mine[-1]
        g = by_width[(parametrization, target["width"])]
        lrs, losses = np.array(g["lr"]), np.array(g["loss"])
        tried = np.unique(lrs)
        nearest = min(tried, key=lambda lr: abs(math.log(lr / proxy["lr"])))
        best = min(tried, key=lambda lr: losses[lrs == lr].mean())
        half_step = 0.5 * float(np.median(np.diff(np.log(tried)))) if tried.size > 1 else 0.0
        beyond = max(math.log(tried[0] / proxy["lr"]), math.log(proxy["lr"] / tried[-1]), 0.0)
        at_best = float(losses[lrs == best].mean())
        at_transfer = float(losses[lrs == nearest].mean()) if beyond <= half_step + 1e-9 else None
        gap = None if at_transfer is None else at_transfer - at_best
        rows.append(
            {
                "parametrization": parametrization,
                "proxy_width": proxy["width"],
                "target_width": target["width"],
                "transferred_lr": proxy["lr"],
                "target_optimum_lr": target["lr"],
                "optimum_ratio": target["lr"] / proxy["lr"],
                "grid_lr_used": float(nearest),
                "loss_at_transferred_lr": at_transfer,
                "best_grid_lr": float(best),
                "best_loss": at_best,
                "loss_gap": gap,
                "relative_gap": None if gap is None else gap / at_best,
                "outside_factor": math.exp(beyond),
            }
        )
    return rows


def _write_lr_markdown(path: pathlib.Path, optima: list[dict], transfer: list[dict], metric: str) -> None:
    lines = [
        f"# Optimum learning rate per width ({metric})",
        "",
        "lr*: vertex of a parabola in ln(lr) through the 5 grid lrs around the best (seed repeats included);",
        "x/÷: its standard error as a factor; *: the best grid lr is at the grid's edge.",
        "",
        "| parametrization | width | m | trials | best grid lr | lr* | x/÷ | loss at lr* | seed spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o in optima:
        factor = "" if o["log_std"] is None else f"{math.exp(o['log_std']):.3f}"
        edge = "*" if o["at_edge"] else ""
        lines.append(
            f"| {o['parametrization']} | {_format(o['width'])} | {_format(o['m'])} | {o['trials']} | "
            f"{o['best_grid_lr']:.4g}{edge} | {o['lr']:.4g} | {factor} | {o['loss']:.4f} | "
            f"{_format(o['seed_spread'])} |"
        )
    if transfer:
        lines += [
            "",
            "## Transfer: the narrowest width's lr* used at the widest width",
            "",
            "| parametrization | widths | lr* ratio (widest / narrowest) | grid lr used | loss there | "
            "best grid lr | best loss | gap |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for t in transfer:
            if t["loss_at_transferred_lr"] is None:
                used, gap = f"{t['transferred_lr']:.4g}", ""
                there = f"not measured: {t['outside_factor']:.1f}x beyond the lrs tried"
            else:
                used, there = f"{t['grid_lr_used']:.4g}", f"{t['loss_at_transferred_lr']:.4f}"
                gap = f"{t['relative_gap']:+.2%}"
            lines.append(
                f"| {t['parametrization']} | {_format(t['proxy_width'])} -> {_format(t['target_width'])} | "
                f"{t['optimum_ratio']:.3f} | {used} | {there} | {t['best_grid_lr']:.4g} | "
                f"{t['best_loss']:.4f} | {gap} |"
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot_lr_transfer(groups: dict[tuple, dict], optima: list[dict], metric: str, path: pathlib.Path) -> bool:
    """Loss vs lr, one line per width (the mean over seeds, bars from min to max), the parabola's optimum
    marked, one panel per parametrization."""
    if not groups:
        return False
    names = sorted({p for p, _ in groups}, key=lambda p: (p != "mup", p))
    fig = Figure(figsize=(5 * len(names), 4), layout="constrained")
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for ax, name in zip(axes, names):
        mine = sorted(
            ((k, g) for k, g in groups.items() if k[0] == name), key=lambda kg: kg[1]["width"] or -1
        )
        for i, (_, g) in enumerate(mine):
            lrs, losses = np.array(g["lr"]), np.array(g["loss"])
            grid = np.unique(lrs)
            values = [losses[lrs == lr] for lr in grid]
            mean = np.array([v.mean() for v in values])
            bars = np.array([[m - v.min(), v.max() - m] for m, v in zip(mean, values)]).T
            label = "all" if g["width"] is None else f"width {g['width']:g}"
            if g["m"] is not None:
                label += f" (m={g['m']:g})"
            ax.errorbar(grid, mean, yerr=bars, marker="o", ms=3, capsize=2, label=label, color=f"C{i}")
            for o in optima:
                if o["parametrization"] == name and o["width"] == g["width"] and o["log_std"] is not None:
                    ax.axvline(o["lr"], color=f"C{i}", ls=":", lw=1)
        _log_x(ax)
        ax.set(xlabel="learning rate", title=f"{name} (dotted: parabola optimum)")
        ax.legend(fontsize="small")
    axes[0].set_ylabel(metric)
    fig.savefig(path, dpi=100)
    return True


def _plot_loss_vs_tokens(records: list[dict], metric: str, path: pathlib.Path) -> bool:
    """Loss vs tokens, one line per setting of the other params (schedules, decay branches); False when no
    setting ran at two or more token budgets."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if _number(r.get("tokens")):
            label = ", ".join(f"{k}={_format(v)}" for k, v in sorted(r["params"].items()) if k != "tokens")
            lines.setdefault(label or "all", []).append((r["tokens"], r[metric]))
    if not any(len({t for t, _ in points}) > 1 for points in lines.values()):
        return False
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for label, points in sorted(lines.items()):
        tokens, losses = np.array(sorted(points)).T
        ax.plot(tokens, losses, marker="o", ms=4, label=label)
    _log_x(ax)
    ax.set(xlabel="tokens", ylabel=metric, title=f"{metric} vs tokens")
    ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=100)
    return True


def _swept_params(records: list[dict]) -> list[str]:
    """Numeric hyperparameters that take two or more values among the trials."""
    names = sorted({name for r in records for name in r["params"]})
    values = {n: {_number(r["params"].get(n)) for r in records} - {None} for n in names}
    return [n for n in names if len(values[n]) >= 2]


def _plot_param(records: list[dict], name: str, metric: str, path: pathlib.Path) -> None:
    points = [(_number(r["params"].get(name)), r[metric]) for r in records]
    x, y = np.array([p for p in points if p[0] is not None]).T
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(x, y)
    if x.min() > 0 and x.max() >= 10 * x.min():
        _log_x(ax)
    ax.set(xlabel=name, ylabel=metric, title=f"{metric} vs {name}")
    fig.savefig(path, dpi=100)


def _plot_compute(
    compute: np.ndarray,
    loss: np.ndarray,
    envelope_fit: fits.ComputeFit | None,
    metric: str,
    path: pathlib.Path,
) -> None:
    envelope_c, envelope_loss = fits.loss_envelope(compute, loss)
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(compute, loss, s=12, alpha=0.5, label="trials")
    ax.scatter(envelope_c, envelope_loss, color="C1", label="envelope")
    if envelope_fit is not None:
        grid = np.geomspace(compute.min(), compute.max(), 100)
        ax.plot(grid, envelope_fit.predict(grid)[0], color="C1", label=f"fit: a={envelope_fit.a:.3f}")
    _log_x(ax)
    ax.set(xlabel="compute (FLOPs)", ylabel=metric, title="loss vs compute")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def _best_by(records: list[dict], key, metric: str) -> list[dict]:
    """The record with the lowest metric in each group of `key(record)`."""
    best: dict = {}
    for r in records:
        group = key(r)
        if group not in best or r[metric] < best[group][metric]:
            best[group] = r
    return list(best.values())


def _fit_loss_nd(records: list[dict], metric: str) -> fits.NDFit:
    sized = [r for r in records if _number(r.get("n_params")) and _number(r.get("tokens"))]
    points = _best_by(sized, lambda r: (r["n_params"], r["tokens"]), metric)
    for key, label in (("n_params", "N"), ("tokens", "D")):
        distinct = len({r[key] for r in points})
        if distinct < _MIN_DISTINCT_SIZES:
            raise ValueError(f"L(N, D) needs {_MIN_DISTINCT_SIZES} or more distinct {label}, got {distinct}")
    return fits.fit_loss_nd(*(np.array([r[k] for r in points]) for k in ("n_params", "tokens", metric)))


def _batch_size_points(records: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(best loss, its batch size) per (N, D) where several batch sizes ran; batch size in tokens when
    params hold seq_len, else in the sweep's unit (sequences)."""
    with_bs = [r for r in records if _number(_param(r["params"], "batch_size"))]
    groups: dict[tuple, list[dict]] = {}
    for r in with_bs:
        groups.setdefault((r.get("n_params"), r.get("tokens")), []).append(r)
    best = [
        min(group, key=lambda r: r[metric])
        for group in groups.values()
        if len({_param(r["params"], "batch_size") for r in group}) >= 2
    ]
    in_tokens = all(_number(_param(r["params"], "seq_len")) for r in best)
    sizes = [
        _param(r["params"], "batch_size") * (_param(r["params"], "seq_len") if in_tokens else 1) for r in best
    ]
    return (
        np.array([r[metric] for r in best]),
        np.array(sizes, dtype=np.float64),
        "tokens" if in_tokens else "sequences",
    )


def _fit_all(
    records: list[dict], metric: str, predict: tuple[float, float] | None, holdout: Sequence[dict] = ()
) -> tuple[dict, fits.ComputeFit | None, fits.NDFit | None]:
    """fits.json content: each fit, or the reason it was skipped; the prediction at `predict`; and each
    held-out run's loss against the L(N, D) prediction at its N and D."""
    result: dict = {"metric": metric, "num_complete": len(records), "skipped": {}}
    nd_fit = envelope_fit = None
    try:
        nd_fit = _fit_loss_nd(records, metric)
        result["loss_nd"] = nd_fit.to_dict()
    except ValueError as e:
        result["skipped"]["loss_nd"] = str(e)
    costed = [r for r in records if _number(r.get("flops"))]
    envelope_c, envelope_loss = fits.loss_envelope([r["flops"] for r in costed], [r[metric] for r in costed])
    try:
        if len(envelope_c) < _MIN_ENVELOPE_POINTS:
            raise ValueError(
                f"the envelope needs {_MIN_ENVELOPE_POINTS} or more points, got {len(envelope_c)}"
            )
        envelope_fit = fits.fit_loss_compute(envelope_c, envelope_loss)
        result["loss_compute"] = {**envelope_fit.to_dict(), "envelope_points": len(envelope_c)}
    except ValueError as e:
        result["skipped"]["loss_compute"] = str(e)
    try:
        losses, sizes, unit = _batch_size_points(records, metric)
        result["batch_size"] = {**fits.fit_batch_size_law(losses, sizes).to_dict(), "unit": unit}
    except ValueError as e:
        result["skipped"]["batch_size"] = f"{e} (best batch size per (N, D) with 2 or more batch sizes)"
    if predict is not None:
        n, d = predict
        prediction: dict = {"N": n, "D": d, "compute": 6.0 * n * d}
        if nd_fit is not None:
            prediction |= _nd_prediction(nd_fit, n, d)
        if envelope_fit is not None:
            mean, std = envelope_fit.predict(6.0 * n * d)
            prediction |= {"envelope_loss": float(mean), "envelope_loss_std": float(std)}
        result["prediction"] = prediction
    if nd_fit is not None and holdout:
        result["holdout"] = [_holdout_row(nd_fit, r, metric) for r in holdout]
    return result, envelope_fit, nd_fit


def _nd_prediction(nd_fit: fits.NDFit, n: float, d: float) -> dict:
    """L(N, D)'s loss and standard deviation at (n, d), and the compute-optimal N and D at 6 n d."""
    mean, std = (float(v) for v in nd_fit.predict(n, d))
    n_opt, d_opt = nd_fit.compute_optimal(6.0 * n * d)
    return {
        "loss": mean,
        "loss_std": std,
        "compute_optimal_N": n_opt,
        "compute_optimal_D": d_opt,
        "compute_optimal_D_over_N": d_opt / n_opt,
    }


def _holdout_row(nd_fit: fits.NDFit, record: dict, metric: str) -> dict:
    n, d, loss = record["n_params"], record["tokens"], record[metric]
    p = _nd_prediction(nd_fit, n, d)
    mean, std = p.pop("loss"), p.pop("loss_std")
    return {
        "trial": record["trial"],
        "N": n,
        "D": d,
        "loss": loss,
        "predicted": mean,
        "predicted_std": std,
        "relative_error": (loss - mean) / loss,
        "sigmas": (loss - mean) / std if std > 0 else None,
        **p,
    }


def _plot_loss_nd(
    records: list[dict], metric: str, nd_fit: fits.NDFit, holdout: list[dict], path: pathlib.Path
) -> None:
    """Loss vs tokens per model size with the fitted L(N, D) curves, and each held-out run against its
    prediction (bar: 2 standard deviations)."""
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    sizes = sorted({r["n_params"] for r in records} | {h["N"] for h in holdout})
    d_all = [r["tokens"] for r in records] + [h["D"] for h in holdout]
    grid = np.geomspace(min(d_all) / 1.5, max(d_all) * 1.5, 100)
    for i, n in enumerate(sizes):
        mine = sorted((r["tokens"], r[metric]) for r in records if r["n_params"] == n)
        if mine:
            ax.scatter(*np.array(mine).T, color=f"C{i % 10}", s=14)
        ax.plot(grid, nd_fit.predict(n, grid)[0], color=f"C{i % 10}", lw=1, label=f"N={n:.3g}")
    for h in holdout:
        ax.errorbar(
            [h["D"]],
            [h["predicted"]],
            yerr=[2 * h["predicted_std"]],
            color="k",
            capsize=3,
            label="held-out: predicted",
        )
        ax.scatter([h["D"]], [h["loss"]], marker="*", s=120, color="k", label="held-out: measured", zorder=3)
    _log_x(ax)
    ax.set(
        xlabel="tokens D", ylabel=metric, title=f"L(N, D): alpha {nd_fit.alpha:.2f}, beta {nd_fit.beta:.2f}"
    )
    ax.legend(fontsize="x-small")
    fig.savefig(path, dpi=100)


def _accuracy_points(records: Sequence[dict]) -> list[dict]:
    """Complete records with a positive ScalingBench loss and an accuracy."""
    return [
        r
        for r in records
        if r["state"] == "complete"
        and (_number(r.get("scalingbench_loss")) or 0.0) > 0.0
        and _number(r.get("scalingbench_accuracy")) is not None
    ]


def _fit_accuracy(records: list[dict], holdout: Sequence[dict]) -> tuple[fits.SigmoidFit, dict]:
    """accuracy = sigmoid(ScalingBench loss) on the records (ValueError under 5 points), and each held-out
    run's accuracy predicted from its ScalingBench loss against the measured one."""
    points = _accuracy_points(records)
    fit = fits.fit_sigmoid(
        [r["scalingbench_loss"] for r in points], [r["scalingbench_accuracy"] for r in points]
    )
    rows = []
    for r in holdout:
        loss = _number(r.get("scalingbench_loss"))
        if r["state"] != "complete" or loss is None:
            continue
        measured, predicted = _number(r.get("scalingbench_accuracy")), float(fit.predict(loss))
        rows.append(
            {
                "trial": r["trial"],
                "scalingbench_loss": loss,
                "accuracy": measured,
                "predicted_accuracy": predicted,
                "error": None if measured is None else measured - predicted,
            }
        )
    return fit, {**fit.to_dict(), "points": len(points), "holdout": rows}


def _plot_accuracy(
    records: list[dict], fit: fits.SigmoidFit, holdout: list[dict], path: pathlib.Path
) -> None:
    """ScalingBench accuracy vs loss: the fit's models, the fitted sigmoid, each held-out model's predicted
    accuracy (circle) and measured one (star)."""
    loss = [r["scalingbench_loss"] for r in records] + [h["scalingbench_loss"] for h in holdout]
    grid = np.linspace(min(loss) - 0.05 * np.ptp(loss), max(loss) + 0.05 * np.ptp(loss), 200)
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(
        loss[: len(records)], [r["scalingbench_accuracy"] for r in records], s=14, label="fit's models"
    )
    ax.plot(grid, fit.predict(grid), color="C1", label=f"sigmoid fit (rmse {fit.rmse:.3f})")
    for i, h in enumerate(holdout):
        ax.scatter(
            [h["scalingbench_loss"]],
            [h["predicted_accuracy"]],
            color="k",
            facecolor="none",
            s=60,
            label="held-out: predicted" if i == 0 else None,
            zorder=3,
        )
        if h["accuracy"] is not None:
            ax.scatter(
                [h["scalingbench_loss"]],
                [h["accuracy"]],
                marker="*",
                s=120,
                color="k",
                label="held-out: measured" if i == 0 else None,
                zorder=3,
            )
    ax.set(xlabel="ScalingBench loss", ylabel="ScalingBench accuracy", title="accuracy = sigmoid(loss)")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def write_report(
    records: Sequence[dict],
    out_dir: str,
    *,
    predict: tuple[float, float] | None = None,
    metric: str = "eval_loss",
    holdout: Sequence[dict] = (),
) -> dict:
    """Writes trials.csv, trials.md, lr_optima.md, the PNG plots and fits.json under out_dir; returns their
    paths and fits.

    `metric` is the loss the plots and fits use; `predict` = (N, D) adds a loss prediction to fits.json;
    `holdout` records (runs kept out of the fits) are compared with the L(N, D) prediction and with the
    accuracy the ScalingBench sigmoid predicts (fits.json `accuracy`).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    check_records(records)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = _table(records, metric)
    _write_csv(out / "trials.csv", header, rows)
    _write_markdown(out / "trials.md", header, rows, metric, wall_hours(records))

    usable = [r for r in records if r["state"] == "complete" and (_number(r.get(metric)) or 0.0) > 0.0]
    plots = []
    groups = _lr_groups(usable, metric)
    optima = lr_optima(groups)
    transfer = lr_transfer(groups, optima)
    if optima:
        _write_lr_markdown(out / "lr_optima.md", optima, transfer, metric)
    if _plot_lr_transfer(groups, optima, metric, out / "loss_vs_lr.png"):
        plots.append(out / "loss_vs_lr.png")
    if _plot_loss_vs_tokens(usable, metric, out / "loss_vs_tokens.png"):
        plots.append(out / "loss_vs_tokens.png")
    for name in _swept_params(usable):
        path = out / f"loss_vs_param_{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.png"
        _plot_param(usable, name, metric, path)
        plots.append(path)
    held = [r for r in holdout if r["state"] == "complete" and _number(r.get(metric))]
    fit_results, envelope_fit, nd_fit = _fit_all(usable, metric, predict, held)
    if nd_fit is not None:
        _plot_loss_nd(usable, metric, nd_fit, fit_results.get("holdout", []), out / "loss_nd.png")
        plots.append(out / "loss_nd.png")
    try:
        accuracy_fit, fit_results["accuracy"] = _fit_accuracy(records, holdout)
        prediction = fit_results.get("prediction", {})
        if metric == "scalingbench_loss" and "loss" in prediction:
            prediction["accuracy"] = float(accuracy_fit.predict(prediction["loss"]))
        path = out / "accuracy_vs_scalingbench.png"
        _plot_accuracy(_accuracy_points(records), accuracy_fit, fit_results["accuracy"]["holdout"], path)
        plots.append(path)
    except ValueError as e:
        fit_results["skipped"]["accuracy"] = f"{e} (complete trials with scalingbench_loss and _accuracy)"
    fit_results |= {"lr_optima": optima, "lr_transfer": transfer}
    costed = [r for r in usable if _number(r.get("flops"))]
    if costed:
        compute = np.array([r["flops"] for r in costed], dtype=np.float64)
        loss = np.array([r[metric] for r in costed], dtype=np.float64)
        _plot_compute(compute, loss, envelope_fit, metric, out / "loss_vs_compute.png")
        plots.append(out / "loss_vs_compute.png")
    (out / "fits.json").write_text(json.dumps(fit_results, indent=2) + "\n", encoding="utf-8")
    return {
        "csv": str(out / "trials.csv"),
        "markdown": str(out / "trials.md"),
        "fits_json": str(out / "fits.json"),
        "plots": [str(p) for p in plots],
        "fits": fit_results,
    }
