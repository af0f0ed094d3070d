"""The wind-tunnel study's machinery: union grids with seed repeats, the parabola lr optimum, the transfer
table, and a held-out run against the L(N, D) prediction (synthetic records with known answers)."""

import json
import math

import numpy as np
import pytest

from mct.tunnel import report, sweep
from mct.tunnel.fits import lr_optimum


def _study(**fields):
    study = sweep.default_study()
    study.update(fields)
    return study


def test_union_grid_in_order_and_seed_repeats_of_each_finished_groups_best_lrs():
    study = _study(
        grids=[
            {"parametrization": ["mup"], "width": [32, 64], "lr": [0.01, 0.02, 0.04, 0.08]},
            {"parametrization": ["sp"], "width": [64], "lr": [0.02, 0.04]},
            {"parametrization": ["mup"], "width": [32], "lr": [0.01]},
        ],  # a duplicate point
        repeat_top=2,
        repeat_seeds=(1, 2),
    )
    points = sweep.grid_points(study)
    assert len(points) == 10 and points[0] == {"parametrization": "mup", "width": 32, "lr": 0.01}
    assert points[-1] == {"parametrization": "sp", "width": 64, "lr": 0.04}
    loss = {0.01: 3.3, 0.02: 3.1, 0.04: 3.0, 0.08: float("nan")}  # a diverged lr never ranks among the best
    records = [{"point": p, "eval_loss": loss[p["lr"]]} for p in points if p["width"] == 32]
    records += [{"point": points[4], "eval_loss": 3.0}]  # width 64 under muP: one of its 4 lrs finished
    repeats = sweep.repeat_points(study, records)
    assert repeats == [{**points[i], "seed": s} for i in (2, 1) for s in (1, 2)]  # width 32 only: 0.04, 0.02


def test_lr_optimum_finds_the_vertex_and_its_error_from_the_seed_noise():
    lrs = 0.01 * 2 ** (np.arange(-3, 4) / 2)
    exact = lr_optimum(lrs, 3.0 + 0.2 * np.log(lrs / 0.013) ** 2)
    assert exact.lr == pytest.approx(0.013, rel=1e-9) and exact.loss == pytest.approx(3.0)
    assert exact.best_grid_lr == pytest.approx(0.01414, rel=1e-3) and not exact.at_edge
    rng = np.random.default_rng(0)
    noisy = np.repeat(lrs, 4)  # 4 seeds a point
    estimates = [
        lr_optimum(noisy, 3.0 + 0.2 * np.log(noisy / 0.013) ** 2 + rng.normal(0, 0.01, noisy.size))
        for _ in range(200)
    ]
    errors = np.array([math.log(e.lr / 0.013) for e in estimates])
    stds = np.array([e.log_std for e in estimates])
    assert 0.7 < errors.std() / stds.mean() < 1.4  # the stated error matches the spread over repeats
    edge = lr_optimum(lrs, 3.0 + 0.2 * np.log(lrs / 0.002) ** 2)  # the optimum lies below the grid
    assert edge.at_edge and edge.best_grid_lr == pytest.approx(lrs[0])


def _lr_records() -> list[dict]:
    """muP: optimum 0.01 at every width; SP: optimum 0.01 * 64 / width (moves with m); 2 seeds at 3 lrs."""
    records = []
    for parametrization in ("mup", "sp"):
        for width in (32, 64, 128, 256):
            optimum = 0.01 if parametrization == "mup" else 0.01 * 64 / width
            floor = 3.0 - 0.1 * math.log2(width)
            for k in range(-3, 4):
                lr = 0.01 * 2 ** (k / 2) * (1 if parametrization == "mup" else 64 / width)
                for seed in (0, 1) if abs(k) <= 1 else (0,):
                    params = {"parametrization": parametrization, "width": width, "lr": lr, "seed": seed}
                    loss = floor + 0.1 * math.log(lr / optimum) ** 2 + 0.002 * seed
                    records.append(
                        {
                            "trial": len(records),
                            "params": params,
                            "state": "complete",
                            "eval_loss": loss,
                            "config": {"model": {"dim_model_base": 64}},
                        }
                    )
    return records


def test_report_tables_each_widths_optimum_and_the_transfer_gap(tmp_path):
    written = report.write_report(_lr_records(), str(tmp_path))
    optima = {(o["parametrization"], o["width"]): o for o in written["fits"]["lr_optima"]}
    assert optima[("mup", 256)]["lr"] == pytest.approx(0.01, rel=0.02) and optima[("mup", 32)]["m"] == 0.5
    assert optima[("sp", 256)]["lr"] == pytest.approx(0.0025, rel=0.02)
    assert optima[("mup", 64)]["seed_spread"] == pytest.approx(0.002) and optima[("mup", 64)]["trials"] == 10
    transfer = {t["parametrization"]: t for t in written["fits"]["lr_transfer"]}
    assert (
        transfer["mup"]["optimum_ratio"] == pytest.approx(1.0, rel=0.03)
        and transfer["mup"]["loss_gap"] < 1e-3
    )
    assert transfer["sp"]["optimum_ratio"] == pytest.approx(
        1 / 8, rel=0.03
    )  # SP: the 32's lr* is 8x too large
    # ... and 2.8x above the largest lr of width 256's SP grid (centred on its own optimum): no loss to show
    assert transfer["sp"]["loss_gap"] is None and transfer["sp"]["outside_factor"] == pytest.approx(
        2**1.5, rel=0.03
    )
    table = (tmp_path / "lr_optima.md").read_text()
    assert "| mup | 256 | 4 | 10 |" in table and "32 -> 256" in table and "2.8x beyond the lrs tried" in table
    assert (tmp_path / "loss_vs_lr.png").stat().st_size > 0


def test_a_held_out_run_is_compared_with_the_fits_prediction(tmp_path):
    law = lambda n, d: 208.0 * n**-0.29 + 200.0 * d**-0.23 + 1.7  # noqa: E731
    fitted = [
        {
            "trial": i,
            "params": {"width": n},
            "state": "complete",
            "n_params": n,
            "tokens": d,
            "eval_loss": law(n, d),
        }
        for i, (n, d) in enumerate((n, d) for n in (1e5, 3e5, 1e6, 3e6) for d in (5e5, 1e6, 2e6, 4e6))
    ]
    held = [
        {
            "trial": 0,
            "params": {"width": 512},
            "state": "complete",
            "n_params": 1.2e7,
            "tokens": 4e6,
            "eval_loss": law(1.2e7, 4e6) * 1.01,
        }
    ]
    written = report.write_report(fitted, str(tmp_path), holdout=held)
    (row,) = json.loads((tmp_path / "fits.json").read_text())["holdout"]
    assert row["relative_error"] == pytest.approx(0.01 / 1.01, abs=1e-3)  # the 1% the run is off the law
    assert row["predicted"] == pytest.approx(law(1.2e7, 4e6), rel=1e-3)
    assert row["compute_optimal_N"] * row["compute_optimal_D"] == pytest.approx(1.2e7 * 4e6)
    assert str(tmp_path / "loss_nd.png") in written["plots"]
