"""End-to-end training runs on a tiny model: sharding parity, resume, kill/preemption, branches, errors."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import pytest

from mct.errors import ConfigError, TrainingDiverged
from mct.run.checkpoint import Checkpointer
from mct.run.training_run import train
from tests.data_fixtures import make_tiny_dataset
from tests.tiny_runs import REPO, VOCAB, cli, first_metrics, losses, make_config

ONE = jax.devices()[:1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=VOCAB, num_docs=200)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, dataset):
    """An uninterrupted 10-step run on one device, checkpoints at 5 and 10."""
    workdir = tmp_path_factory.mktemp("reference")
    result = train(make_config(workdir, dataset), devices=ONE)
    return workdir, result


def test_run_writes_metrics_checkpoints_and_learns(reference_run):
    workdir, result = reference_run
    steps = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in steps if "loss" in m]
    assert [m["step"] for m in train_lines] == list(range(1, 11))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert key in train_lines[-1]
    assert [m["step"] for m in steps if "eval_loss" in m] == [5, 10]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert Checkpointer(workdir, read_only=True).all_steps() == [5, 10]
    assert list((workdir / "tensorboard").iterdir())


def test_eight_devices_match_one(tmp_path, dataset, reference_run):
    """data=2, fsdp=2, tensor=2 on 8 simulated devices: same losses as 1 device to 1e-4 relative."""
    train(
        make_config(
            tmp_path, dataset, **{"train.steps": 10, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
        )
    )
    want, got = losses(reference_run[0]), losses(tmp_path)
    for step in range(1, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-4)


def test_resume_gives_identical_losses_and_restores_onto_another_mesh(tmp_path, dataset, reference_run):
    ref_dir, _ = reference_run
    same, other = tmp_path / "same", tmp_path / "other"
    for workdir in (same, other):
        shutil.copytree(ref_dir / "checkpoints" / "5", workdir / "checkpoints" / "5")
    train(make_config(same, dataset), devices=ONE)
    train(make_config(other, dataset, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    want = losses(ref_dir)
    assert sorted(losses(same)) == [6, 7, 8, 9, 10]
    for step in range(6, 11):
        assert losses(same)[step] == want[step]  # same device, same data: bit-identical
        assert losses(other)[step] == pytest.approx(want[step], rel=1e-4)


def test_resuming_a_finished_run_reports_its_final_metrics(tmp_path, dataset, reference_run):
    """A sweep re-queues a trial whose worker died after the last checkpoint: nothing is left to train, and the
    result must still carry the final train loss and a fresh eval of the restored params."""
    ref_dir, ref_result = reference_run
    shutil.copytree(ref_dir, tmp_path / "run")
    result = train(make_config(tmp_path / "run", dataset), devices=ONE)
    assert result["step"] == 10 and result["loss"] == ref_result["loss"]
    assert result["eval_loss"] == pytest.approx(ref_result["eval_loss"], rel=1e-6)


def _wait_for_checkpoint(workdir: pathlib.Path, proc: subprocess.Popen, at_least: int, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stderr.read().decode()[-3000:]}")
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.name.isdigit()]
        if steps and max(steps) >= at_least:
            return
        time.sleep(0.2)
    raise AssertionError("no checkpoint in time")


def test_sigkill_resumes_from_last_committed_checkpoint(tmp_path, dataset):
    args = {"train.steps": 40, "checkpoint.every_steps": 4, "checkpoint.async_save": False}
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.Popen(cli(tmp_path, dataset, **args), cwd=REPO, env=env, stderr=subprocess.PIPE)
    _wait_for_checkpoint(tmp_path, proc, at_least=8)
    proc.kill()
    proc.wait()
    killed_at = max(Checkpointer(tmp_path, read_only=True).all_steps())
    assert killed_at < 40
    done = subprocess.run(cli(tmp_path, dataset, **args), cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    reference = tmp_path / "uninterrupted"  # same command, same environment: bit-identical numerics
    done = subprocess.run(
        cli(reference, dataset, **args), cwd=REPO, env=env, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    want, got = losses(reference), losses(tmp_path)
    for step in range(killed_at + 1, 41):
        assert got[step] == pytest.approx(want[step], rel=1e-6)


def test_a_crash_right_after_a_checkpoint_keeps_that_steps_metrics(tmp_path, dataset, monkeypatch):
    """A resumed run starts after its checkpoint, so the checkpointed step's metrics line must already exist."""
    save = Checkpointer.save

    def save_then_crash(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == 3:
            raise RuntimeError("crash after the commit")

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    args = {"checkpoint.every_steps": 3, "eval.every_steps": 10, "checkpoint.async_save": False}
    with pytest.raises(RuntimeError, match="crash after the commit"):
        train(make_config(tmp_path, dataset, **args), devices=ONE)
    assert Checkpointer(tmp_path, read_only=True).all_steps() == [3]
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_sigterm_saves_and_exits_zero(tmp_path, dataset):
    args = {"train.steps": 100000, "checkpoint.every_steps": 1000, "eval.every_steps": 3}
    proc = subprocess.Popen(
        cli(tmp_path, dataset, **args), cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, stderr=subprocess.PIPE
    )
    deadline = time.time() + 180
    while not (tmp_path / "metrics.jsonl").exists() or len(losses(tmp_path)) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-3000:]
    saved = Checkpointer(tmp_path, read_only=True).all_steps()
    assert len(saved) == 1 and saved[0] >= 3


def test_decay_branch_leaves_source_untouched(tmp_path, dataset):
    source = tmp_path / "stable"
    args = {"train.steps": 20, "schedule.decay_steps": 5, "checkpoint.every_steps": 5}
    train(make_config(source, dataset, **args), devices=ONE)

    def snapshot():
        return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in source.rglob("*"))

    before = snapshot()
    branch = tmp_path / "branch"
    config = make_config(
        branch,
        dataset,
        **{"schedule.branch_from": str(source), "schedule.branch_step": 10, "schedule.decay_steps": 4},
    )
    train(config, devices=ONE)
    assert snapshot() == before
    first = first_metrics(branch)
    assert first["step"] == 11
    assert first["lr"] == pytest.approx(config.optimizer.lr, rel=1e-6)  # f(0) = 1: the stable lr
    assert Checkpointer(branch, read_only=True).latest_step() == 14
    bad = make_config(
        tmp_path / "bad", dataset, **{"schedule.branch_from": str(source), "schedule.branch_step": 20}
    )
    with pytest.raises(ConfigError, match="decay phase"):
        train(bad, devices=ONE)


def test_nonfinite_losses_stop_the_run_keeping_the_last_checkpoint(tmp_path, dataset):
    config = make_config(
        tmp_path,
        dataset,
        **{
            "optimizer.lr": 1e30,
            "schedule.warmup_steps": 0,
            "checkpoint.every_steps": 1,
            "train.max_consecutive_nonfinite": 3,
        },
    )
    with pytest.raises(TrainingDiverged, match="3 consecutive non-finite"):
        train(config, devices=ONE)
    assert Checkpointer(tmp_path, read_only=True).latest_step() is not None


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"mesh.data": 3}, "does not fit the 8 available devices"),
        ({"mesh.data": 1, "mesh.tensor": 8}, "n_heads=4 is not divisible by mesh.tensor=8"),
        ({"mesh.data": 8, "train.batch_size": 4}, "not divisible by mesh data x fsdp"),
        ({"mesh.data": -1, "model.attention": "flash9"}, "model.attention"),
    ],
)
def test_bad_configs_fail_before_compiling(tmp_path, dataset, extra, message):
    with pytest.raises(ConfigError, match=message):
        train(make_config(tmp_path, dataset, **extra))


def test_incompatible_checkpoint_is_a_clear_error(tmp_path, dataset, reference_run):
    shutil.copytree(reference_run[0] / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ConfigError, match=r"incompatible model \(d_model: checkpoint 64 vs config 32\)"):
        train(make_config(tmp_path, dataset, **{"model.d_model": 32}), devices=ONE)


def test_unknown_config_key_is_a_clear_cli_error(tmp_path, dataset):
    out = subprocess.run(
        cli(tmp_path, dataset, **{"model.n_layerz": 3}), cwd=REPO, capture_output=True, timeout=120
    )
    assert out.returncode != 0
    assert "n_layerz" in out.stderr.decode()
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("damage", ["truncate", "marker"])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, dataset, reference_run, damage):
    shutil.copytree(reference_run[0] / "checkpoints", tmp_path / "checkpoints")
    step_dir = tmp_path / "checkpoints" / "10"
    if damage == "truncate":
        for f in (step_dir / "state").rglob("d/*"):
            f.write_bytes(f.read_bytes()[:7])
    else:
        (step_dir / "state" / "commit_success.txt").unlink()
    train(make_config(tmp_path, dataset), devices=ONE)
    assert sorted(losses(tmp_path)) == [6, 7, 8, 9, 10]  # resumed from step 5
    assert list((tmp_path / "checkpoints").glob("10.corrupt-*"))  # kept aside, not deleted
    assert Checkpointer(tmp_path, read_only=True).all_steps() == [5, 10]


def _copy_with_unreadable_checkpoints(tmp_path, reference_run) -> None:
    shutil.copytree(reference_run[0] / "checkpoints", tmp_path / "checkpoints")
    for step in ("5", "10"):
        (tmp_path / "checkpoints" / step / "commit_success.txt").unlink()


def test_no_readable_checkpoint_is_a_clear_error(tmp_path, dataset, reference_run):
    _copy_with_unreadable_checkpoints(tmp_path, reference_run)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint left"):
        train(make_config(tmp_path, dataset), devices=ONE)


def test_a_rerun_after_every_checkpoint_was_moved_aside_refuses_a_silent_fresh_start(
    tmp_path, dataset, reference_run
):
    _copy_with_unreadable_checkpoints(tmp_path, reference_run)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint left"):
        train(make_config(tmp_path, dataset), devices=ONE)
    with pytest.raises(
        ConfigError, match=r"moved aside \(10\.corrupt-\d+, 5\.corrupt-\d+\).*allow_fresh_start"
    ):
        train(make_config(tmp_path, dataset), devices=ONE)
    train(
        make_config(tmp_path, dataset, **{"checkpoint.allow_fresh_start": True, "train.steps": 5}),
        devices=ONE,
    )
    assert Checkpointer(tmp_path, read_only=True).all_steps() == [5]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, dataset):
    for override, message in [
        ({"train.stepz": 3}, "error: unknown config key train.stepz (did you mean train.steps?)"),
        ({"data.seq_len": 0}, "error: config data.seq_len=0 must be in [1, model.max_position=32768]"),
        ({"optimizer.lr": -1.0}, "error: config optimizer.lr=-1.0 must be positive"),
    ]:
        out = subprocess.run(cli(tmp_path, dataset, **override), cwd=REPO, capture_output=True, timeout=120)
        assert out.returncode == 2, out.stderr.decode()[-2000:]
        assert out.stderr.decode().strip().splitlines()[-1] == message
        assert "Traceback" not in out.stderr.decode()
    assert not (tmp_path / "checkpoints").exists()


def test_profiler_hook_writes_a_trace_tensorboard_opens(tmp_path, dataset):
    train(make_config(tmp_path, dataset, **{"profile.steps": (2, 4), "train.steps": 5}), devices=ONE)
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
