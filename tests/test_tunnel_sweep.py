"""Wind-tunnel sweeps end to end (real tiny training runs as Optuna trials) and the muP coordinate check."""

import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy

from mct.errors import UserError
from mct.run.task_files import read_tasks
from mct.tunnel import sweep
from mct.tunnel.coord_check import coord_check
from tests.data_fixtures import make_tiny_dataset
from tests.tiny_runs import REPO, VOCAB, losses

STUDY_FILE = """
from mct.tunnel.sweep import default_study

def get_config():
    c = default_study()
    c.name = "tiny"
    c.workdir = "{workdir}"
    c.base_config = "{repo}/experiments/configs/tiny_cpu.py"
    c.n_layers = 2
    c.head_dim = 16
    c.space = {{"width": [32, 64], "lr": [0.01, 1e30]}}  # lr 1e30 overflows: a diverged trial per width
    c.tokens = 8 * 32 * 8
    c.heartbeat_s = 1
    c.scalingbench = ""
    c.overrides = {{
        "data": {{"mixture": {{"default": {{"path": "{dataset}"}}}}, "seq_len": 32, "eval_batches": 1}},
        "model": {{"vocab_size": {vocab}}},
        "train": {{"batch_size": 8, "max_consecutive_nonfinite": 2}},
        "mesh": {{"data": -1}},
    }}
    return c
"""


def _count_done(storage: str) -> int:
    try:
        return sweep.finished_trials(optuna.load_study(study_name="tiny", storage=storage))
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # not created yet, or the sweep is creating the schema
        return 0


def _initial_loss(record: dict) -> float:
    """A trial's train loss at its initial params: the first logged step's, computed before that step's update."""
    trial_losses = losses(record["config"]["workdir"])
    return trial_losses[min(trial_losses)]


def test_study_completes_resumes_after_interrupt_and_records_divergence(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "data", vocab_size=VOCAB, num_docs=100)
    study_file = tmp_path / "study.py"
    workdir = tmp_path / "study"
    study_file.write_text(STUDY_FILE.format(workdir=workdir, repo=REPO, dataset=dataset, vocab=VOCAB))
    command = [sys.executable, "-m", "mct.tunnel", "sweep", "--config", str(study_file)]
    storage = f"sqlite:///{workdir / 'study.db'}"
    first_log = tmp_path / "first.log"
    with first_log.open("wb") as log:  # a file, not a pipe nobody reads: a full pipe would block the sweep
        first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 240
    while (workdir / "study.db").exists() is False or _count_done(storage) < 1:
        assert first.poll() is None, first_log.read_text()[-3000:]
        assert time.time() < deadline, first_log.read_text()[-3000:]
        time.sleep(0.5)
    first.kill()  # interrupted mid-study, maybe mid-trial
    first.wait()
    time.sleep(2.5)  # past the heartbeat grace period: the running trial is stale
    done = subprocess.run(command, cwd=REPO, capture_output=True, timeout=400)
    logs = f"first sitting:\n{first_log.read_text()[-2000:]}\nsecond sitting:\n{done.stderr.decode()[-3000:]}"
    assert done.returncode == 0, logs
    records = sweep.records("tiny", storage)
    finished = {(r["params"]["width"], r["params"]["lr"]): r for r in records if r["state"] != "failed"}
    assert set(finished) == {(32, 0.01), (64, 0.01), (32, 1e30), (64, 1e30)}, (records, logs)
    for width in (32, 64):
        good, bad = finished[(width, 0.01)], finished[(width, 1e30)]
        # learned: below its own untrained loss (an untrained model's ~ln 320 = 5.77 would pass a fixed 6.0)
        assert good["state"] == "complete" and good["eval_loss"] < _initial_loss(good), (good, logs)
        assert bad["state"] == "diverged" and "non-finite" in bad["error"], (bad, logs)
        for key in ("config", "tokens", "flops", "train_loss", "wall_s", "n_params"):
            assert key in good
        assert good["trial_wall_s"] >= good["wall_s"] > 0  # the trial's whole time from the database
    out = tmp_path / "report"
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "mct.tunnel",
            "report",
            "--study",
            "tiny",
            "--storage",
            storage,
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr.decode()[-3000:]
    assert (out / "trials.md").read_text().count("diverged") >= 2
    assert (out / "loss_vs_lr.png").stat().st_size > 0


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp():
    result = coord_check(widths=(64, 512), steps=3, n_layers=2)
    mup, sp = result["mup"], result["sp"]
    for layer in range(2):  # muP: activation scale within 1.5x from width 64 to 512 (measured ~1.2x)
        ratio = mup[512]["layers"][layer] / mup[64]["layers"][layer]
        assert 1 / 1.5 < ratio < 1.5
    assert sp[512]["logits"] / sp[64]["logits"] > 2  # standard parametrization: logits grow with width
    assert sp[512]["layers"][-1] / sp[64]["layers"][-1] > 4


def test_decay_branches_share_one_stable_run(tmp_path):
    """study.decay_tokens: one stable run per trial, a WSD decay branch per token budget, one record each."""
    dataset = make_tiny_dataset(tmp_path / "data", vocab_size=VOCAB, num_docs=100)
    study = sweep.default_study()
    study.update(
        dict(
            name="branches",
            workdir=str(tmp_path / "study"),
            base_config=str(REPO / "experiments/configs/tiny_cpu.py"),
            n_layers=2,
            head_dim=16,
            width=32,
            space={"lr": [0.01]},
            decay_tokens=(8 * 32 * 10, 8 * 32 * 20),
            decay_frac=0.2,
            scalingbench="",
        )
    )
    study.overrides = {
        "data": {"mixture": {"default": {"path": str(dataset)}}, "seq_len": 32, "eval_batches": 1},
        "model": {"vocab_size": VOCAB},
        "train": {"batch_size": 8},
        "mesh": {"data": -1},
    }
    stable, branches = sweep.decay_branch_configs(
        sweep.trial_config(study, {"lr": 0.01}, str(tmp_path / "t")), study.decay_tokens, 0.2, 0.1
    )
    assert stable.train.steps == 16 and stable.schedule.decay_steps == 0 and stable.schedule.warmup_steps == 1
    assert [(b.schedule.branch_step, b.schedule.decay_steps) for b in branches] == [
        (8, 2),
        (16, 4),
    ]
    sweep.work(study)
    records = sweep.records("branches", sweep.storage_url(study))
    assert all(r["state"] == "complete" for r in records), records
    assert [r["tokens"] for r in records] == [8 * 32 * 10, 8 * 32 * 20]
    assert all(r["state"] == "complete" and r["eval_loss"] > 0 for r in records)


def test_storage_waits_while_another_process_creates_the_schema(tmp_path, monkeypatch):
    """Two processes opening a new study database at once: one stamps the schema version, the other's
    INSERT fails on the unique key; the loser retries instead of crashing the sweep."""
    real, calls = optuna.storages.RDBStorage, []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) < 3:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    storage = sweep.connect_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert len(calls) == 3 and isinstance(storage, real)


def test_a_trial_taken_by_a_worker_that_died_before_its_first_heartbeat_is_rerun(tmp_path, monkeypatch):
    """Optuna never calls a running trial without a heartbeat stale; the next sitting must still run its point."""
    study = sweep.default_study()
    study.workdir, study.heartbeat_s = str(tmp_path), 1
    study.space = {"width": [32], "lr": [0.01, 0.02]}
    s = sweep.open_study(study)
    sweep.enqueue_new_points(s, study)
    zombie = s.ask()  # RUNNING, and its worker dies before the heartbeat thread starts
    ran = []

    def fake_trial(study, trial):
        ran.append(trial.user_attrs["point"]["lr"])
        trial.set_user_attr("records", [{"state": "complete"}])
        return 1.0

    monkeypatch.setattr(sweep, "run_trial", fake_trial)
    done = sweep.work(study)
    assert sorted(ran) == [0.01, 0.02] and zombie.user_attrs["point"]["lr"] in ran
    assert sweep.finished_trials(done) == 2


def test_a_study_names_its_base_config(tmp_path):
    """The library holds no repo-relative default: a study without base_config is one line naming the key."""
    with pytest.raises(UserError, match="study study: base_config is empty"):
        sweep.trial_config(sweep.default_study(), {"lr": 0.01}, str(tmp_path / "t"))


def test_scalingbench_tasks_are_each_trials_eval_tasks_and_their_mean_acc_its_accuracy(tmp_path):
    study = sweep.default_study()
    study.base_config = str(REPO / "experiments/configs/tiny_cpu.py")
    study.scalingbench_tasks = 4
    config = sweep.trial_config(study, {"lr": 0.01}, str(tmp_path / "t"))
    tasks = read_tasks(config.eval.tasks)
    assert [(t.name, len(t.docs)) for t in tasks] == [("scalingbench_math", 4), ("scalingbench_code", 4)]
    assert all(t.path.parent == tmp_path / "t" / "scalingbench_tasks" for t in tasks)
    logged = {"task/scalingbench_math/acc": 0.5, "task/scalingbench_code/acc": 0.75, "task/other/acc": 0.0}
    assert sweep.scalingbench_accuracy(logged | {"task/scalingbench_math/acc_norm": 1.0}) == 0.625
    assert sweep.scalingbench_accuracy({"eval_loss": 3.0}) is None
