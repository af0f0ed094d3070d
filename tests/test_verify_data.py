"""mct.tunnel verify_data: two decay branches from one stable checkpoint (the run's mixture, and 70/30 with a
candidate), the same eval sets, a report and a plot; bad input is one line.
"""

import json
import math

import jax
import pytest

from mct.cli import tunnel as tunnel_cli
from mct.config.run import Config
from mct.run.checkpoint import Checkpointer
from mct.run.training_run import train
from mct.tunnel import verify_data
from tests.data_fixtures import make_tiny_dataset
from tests.tiny_runs import VOCAB, make_config

ONE = jax.devices()[:1]


def test_verify_data_runs_both_branches_and_reports(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "data", VOCAB, num_docs=64)
    candidate = make_tiny_dataset(
        tmp_path / "candidate",
        num_docs=40,
        seed=5,
        tag="candidate",
        tokenizer=str(dataset / "tokenizer.json"),
    )
    bench = tmp_path / "bench.jsonl"  # problems short enough for seq_len 32 (the default set needs ~200)
    bench.write_text(
        "".join(json.dumps({"question": f"{i} + {i} =", "solution": f" {2 * i}"}) + "\n" for i in range(8))
    )
    source = tmp_path / "source"
    settings = {
        "train.steps": 8,
        "schedule.decay_steps": 2,
        "checkpoint.every_steps": 4,
        "eval.every_steps": 4,
        "eval.scalingbench": str(bench),
    }
    train(make_config(source, dataset, **settings), devices=ONE)
    out = tmp_path / "verify"
    summary = verify_data.verify_data(str(source), 4, str(candidate), 0.3, 2, str(out), devices=ONE)
    assert set(summary["losses"]) == {"default", "candidate"}
    for losses in summary["losses"].values():
        assert set(losses) == set(verify_data.METRICS) and all(math.isfinite(v) for v in losses.values())
    assert summary["difference"]["eval_loss"] == pytest.approx(
        summary["losses"]["candidate"]["eval_loss"] - summary["losses"]["default"]["eval_loss"]
    )
    mixtures = {}
    for name in ("default", "candidate"):
        meta = Checkpointer(out / name, read_only=True).read_meta(6)  # branch step 4 + 2 decay steps
        mixtures[name] = {n: c.weight for n, c in Config.from_dict(meta["config"]).data.mixture.items()}
    assert mixtures == {
        "default": {"default": 1.0},
        "candidate": {"default": pytest.approx(0.7), verify_data.CANDIDATE: 0.3},
    }
    assert "| eval_loss |" in (out / "report.md").read_text()
    assert (out / "losses.png").read_bytes()[:4] == b"\x89PNG"


def test_verify_data_bad_input_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tunnel_cli.main(
            ["verify_data", "--from", str(tmp_path / "nothing"), "--step", "3", "--candidate", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
