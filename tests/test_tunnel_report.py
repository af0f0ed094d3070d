"""The sweep report writes its table, plots and fits; diverged and failed trials stay out of the fits; the
ScalingBench loss -> accuracy sigmoid predicts a held-out model's accuracy."""

import csv
import json
import math

import numpy as np
import pytest
from matplotlib import image

from mct.cli.tunnel import main
from mct.tunnel import report

TRUE = {"C_N": 208.0, "alpha": 0.29, "C_D": 200.0, "beta": 0.23, "L0": 1.7}
BATCH_K, BATCH_GAMMA, SEQ_LEN = 1.21e9, 6.24, 512
SIGMOID = {"floor": 0.25, "ceiling": 0.85, "slope": 4.0, "midpoint": 4.1}  # over ScalingBench losses 3.5-4.8


def true_loss(n, d):
    return TRUE["C_N"] * n ** -TRUE["alpha"] + TRUE["C_D"] * d ** -TRUE["beta"] + TRUE["L0"]


def true_accuracy(scalingbench_loss):
    """MiniCPM4's accuracy = sigmoid(ScalingBench loss), falling from ceiling to floor (4 choices: 0.25)."""
    rise = 1.0 + np.exp(SIGMOID["slope"] * (scalingbench_loss - SIGMOID["midpoint"]))
    return SIGMOID["floor"] + (SIGMOID["ceiling"] - SIGMOID["floor"]) / rise


def held_out() -> dict:
    """A width-1024 model kept out of the fits, on the laws and the sigmoid."""
    n, d = 1500.0 * 1024**2, 1e10
    loss = true_loss(n, d)
    params = {"lr": 0.01, "width": 1024, "parametrization": "mup"}
    return {
        "trial": 999,
        "params": params,
        "n_params": n,
        "tokens": d,
        "flops": 6.0 * n * d,
        "state": "complete",
    } | {
        "eval_loss": loss,
        "scalingbench_loss": loss + 0.3,
        "scalingbench_accuracy": true_accuracy(loss + 0.3),
    }


def synthetic_records() -> list[dict]:
    """muP trials over width x tokens x lr x batch size whose best point per (N, D) lies on the laws,
    sp trials whose best lr moves with width, and diverged/failed trials with misleading losses."""
    records = []

    def add(params, n, d, loss, state="complete"):
        records.append(
            {
                "trial": len(records),
                "params": params,
                "n_params": n,
                "tokens": d,
                "flops": 6.0 * n * d,
                "train_loss": loss,
                "eval_loss": loss,
                "scalingbench_loss": None if loss is None else loss + 0.3,
                "scalingbench_accuracy": None if loss is None else true_accuracy(loss + 0.3),
                "wall_s": 10.0,
                "state": state,
            }
        )

    for width in (256, 384, 512, 768):
        n = 1500.0 * width**2
        for d in (1e9, 3e9, 1e10):
            best = true_loss(n, d)
            bs_opt = BATCH_K / best**BATCH_GAMMA / SEQ_LEN  # in sequences
            for lr in (0.003, 0.01, 0.03):
                for factor in (0.5, 1.0, 2.0):
                    loss = best + 0.1 * math.log10(lr / 0.01) ** 2 + 0.05 * math.log2(factor) ** 2
                    params = {"lr": lr, "width": width, "parametrization": "mup"}
                    add(params | {"batch_size": bs_opt * factor, "seq_len": SEQ_LEN}, n, d, loss)
            for lr in (0.003, 0.01, 0.03):  # standard parametrization: the best lr shrinks with width
                params = {
                    "lr": lr,
                    "width": width,
                    "parametrization": "sp",
                    "batch_size": bs_opt,
                    "seq_len": SEQ_LEN,
                }
                add(params, n, d, best + 0.05 + 0.1 * math.log10(lr * width / 2.56) ** 2)
    add({"lr": 1.0, "width": 256, "parametrization": "mup"}, 1500.0 * 256**2, 1e10, 0.5, state="diverged")
    add(
        {"lr": 0.3, "width": 768, "parametrization": "sp"},
        1500.0 * 768**2,
        1e9,
        float("nan"),
        state="diverged",
    )
    add({"lr": 0.01, "width": 512, "parametrization": "mup"}, 1500.0 * 512**2, 1e9, None, state="failed")
    return records


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return out, report.write_report(synthetic_records(), str(out), predict=(1e9, 2e10), holdout=[held_out()])


def test_fits_recover_the_laws_without_diverged_trials(written):
    _, result = written
    fits_json = json.loads(open(result["fits_json"]).read())
    assert fits_json == result["fits"]
    assert fits_json["num_complete"] == len(synthetic_records()) - 3
    assert fits_json["skipped"] == {}
    for name, value in TRUE.items():
        assert fits_json["loss_nd"][name] == pytest.approx(value, rel=1e-3), name
    assert fits_json["batch_size"]["unit"] == "tokens"
    assert fits_json["batch_size"]["gamma"] == pytest.approx(BATCH_GAMMA, rel=1e-6)
    assert fits_json["batch_size"]["k"] == pytest.approx(BATCH_K, rel=1e-6)
    assert 0 < fits_json["loss_compute"]["a"] < 1 and fits_json["loss_compute"]["envelope_points"] >= 4
    prediction = fits_json["prediction"]
    assert prediction["loss"] == pytest.approx(true_loss(1e9, 2e10), rel=1e-4)
    assert prediction["compute"] == pytest.approx(6 * 1e9 * 2e10)
    assert prediction["compute_optimal_N"] * prediction["compute_optimal_D"] == pytest.approx(1e9 * 2e10)
    assert {"envelope_loss", "envelope_loss_std"} <= set(prediction)


def test_the_accuracy_sigmoid_predicts_the_held_out_models_accuracy(written):
    accuracy = written[1]["fits"]["accuracy"]
    assert accuracy["points"] == len(synthetic_records()) - 3
    for name, value in SIGMOID.items():
        assert accuracy[name] == pytest.approx(value, rel=1e-9), name
    (row,) = accuracy["holdout"]
    want = held_out()
    assert row["trial"] == 999 and row["scalingbench_loss"] == want["scalingbench_loss"]
    fitted = [r["scalingbench_loss"] for r in synthetic_records() if r["state"] == "complete"]
    assert row["scalingbench_loss"] < min(fitted)  # better than every model of the fit: an extrapolation
    assert row["accuracy"] < SIGMOID["ceiling"] - 0.02  # not yet flat at the ceiling
    assert row["predicted_accuracy"] == pytest.approx(want["scalingbench_accuracy"], abs=1e-9)
    assert abs(row["error"]) < 1e-9


def test_table_marks_diverged_and_failed(written):
    _, result = written
    records = synthetic_records()
    with open(result["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert [r["state"] for r in rows[-3:]] == ["diverged", "diverged", "failed"]
    complete_losses = [float(r["eval_loss"]) for r in rows if r["state"] == "complete"]
    assert complete_losses == sorted(complete_losses)
    assert {"lr", "width", "parametrization", "batch_size", "n_params", "flops"} <= set(rows[0])
    markdown = open(result["markdown"]).read()
    assert markdown.count("**diverged**") == 2 and markdown.count("**failed**") == 1
    assert len([line for line in markdown.splitlines() if line.startswith("| ")]) == len(records) + 1


def test_plots_are_written(written):
    out, result = written
    names = sorted(p.rsplit("/", 1)[-1] for p in result["plots"])
    expected = ["accuracy_vs_scalingbench.png", "loss_nd.png", "loss_vs_compute.png", "loss_vs_lr.png"]
    expected += [f"loss_vs_param_{n}.png" for n in ("batch_size", "lr", "width")]
    assert names == sorted(expected)
    for name in names:
        pixels = image.imread(out / name)
        assert pixels.ndim == 3 and pixels.std() > 0.01  # a real, non-blank image
    assert image.imread(out / "loss_vs_lr.png").shape[1] == 1000  # one panel each for mup and sp


def test_wall_time_counts_each_trial_once_and_its_stable_run():
    """Two decay branches of trial 0 (whose trial_wall_s includes the stable run they branched from) and a
    plain run of trial 1 from a records file (no trial time): 100 s + 30 s."""
    branches = [{"trial": 0, "wall_s": wall, "trial_wall_s": 100.0} for wall in (20.0, 40.0)]
    assert report.wall_hours([*branches, {"trial": 1, "wall_s": 30.0}]) * 3600 == pytest.approx(130.0)


def test_dotted_config_keys_count_as_plain_names(tmp_path):
    renames = {"lr": "optimizer.lr", "width": "model.d_model", "batch_size": "train.batch_size"}
    renames |= {"seq_len": "data.seq_len", "parametrization": "model.parametrization"}
    records = synthetic_records()
    for r in records:
        r["params"] = {renames[k]: v for k, v in r["params"].items()}
    result = report.write_report(records, str(tmp_path))
    assert result["fits"]["batch_size"]["gamma"] == pytest.approx(BATCH_GAMMA, rel=1e-6)
    assert image.imread(tmp_path / "loss_vs_lr.png").shape[1] == 1000


def test_few_trials_skip_fits_with_reasons(tmp_path):
    records = [r for r in synthetic_records() if r["params"].get("parametrization") == "mup"][:5]
    records[0]["scalingbench_accuracy"] = None  # 4 points for the sigmoid's 4 parameters
    result = report.write_report(records, str(tmp_path), predict=None, metric="scalingbench_loss")
    assert set(result["fits"]["skipped"]) == {"loss_nd", "loss_compute", "batch_size", "accuracy"}
    assert "at least 5" in result["fits"]["skipped"]["accuracy"]
    assert "distinct N" in result["fits"]["skipped"]["loss_nd"]
    assert "prediction" not in result["fits"]
    assert image.imread(tmp_path / "loss_vs_lr.png").shape[1] == 500  # one panel


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_report_cli(tmp_path, capsys):
    records_path = write_jsonl(tmp_path / "trials.jsonl", synthetic_records())
    main(
        [
            "report",
            "--records",
            records_path,
            "--out",
            str(tmp_path / "out"),
            "--predict",
            "1e9,2e10",
            "--metric",
            "scalingbench_loss",
            "--json",
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    scalingbench_loss = true_loss(1e9, 2e10) + 0.3  # the laws' loss -> ScalingBench's -> its accuracy
    assert result["fits"]["prediction"]["loss"] == pytest.approx(scalingbench_loss, rel=1e-4)
    assert result["fits"]["prediction"]["accuracy"] == pytest.approx(
        true_accuracy(scalingbench_loss), abs=1e-4
    )
    assert (tmp_path / "out" / "trials.md").is_file() and len(result["plots"]) == 7


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[1].pop("state"), "record 1 (trial 1): missing field 'state'"),
        (lambda r: r[2].update(state="running"), "record 2 (trial 2): field 'state' is 'running'"),
        (lambda r: r[0].update(flops="many"), "record 0 (trial 0): field 'flops' must be a number"),
        (lambda r: r[0].update(params=[1]), "field 'params' must be an object"),
    ],
)
def test_report_cli_bad_records(tmp_path, capsys, mutate, message):
    records = synthetic_records()[:4]
    mutate(records)
    records_path = write_jsonl(tmp_path / "trials.jsonl", records)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--records", records_path, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_report_cli_bad_jsonl(tmp_path, capsys):
    path = tmp_path / "trials.jsonl"
    path.write_text(json.dumps(synthetic_records()[0]) + "\n{oops\n")
    with pytest.raises(SystemExit, match="^2$"):
        main(["report", "--records", str(path), "--out", str(tmp_path / "out")])
    assert "trials.jsonl:2: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        main(["report", "--records", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "out")])
    assert "does not exist" in capsys.readouterr().err


def test_metric_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="metric must be one of"):
        report.write_report(synthetic_records(), str(tmp_path), metric="accuracy")
    assert np.isnan(synthetic_records()[-2]["eval_loss"])  # the diverged NaN survives into the records
