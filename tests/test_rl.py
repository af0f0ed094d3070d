"""Chunk-wise rollout (mct/posttrain/rollout.py) and the RL run (mct/posttrain/rl.py): chunked == unchunked under greedy
decoding, cached log-probs and policy versions survive chunking, a run killed mid-way resumes exactly, export works."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mct.config.model import model_from_dict
from mct.config.posttrain import RLRunConfig
from mct.config.run import Config
from mct.errors import ConfigError
from mct.export.hf_export import export
from mct.infer.decoding import Sampling, params_model
from mct.posttrain import rl
from mct.posttrain.grpo import token_logprobs
from mct.posttrain.rl import training_rows
from mct.posttrain.rollout import Trajectory, rollout, rollout_chunk
from mct.run.checkpoint import Checkpointer, model_signature
from mct.run.init_from import read_init_source
from mct.run.reader import RunCheckpoint
from tests.data_fixtures import make_tiny_dataset
from tests.tiny_runs import REPO, VOCAB, make_config, overrides

ONE = jax.devices()[:1]
CFG = model_from_dict(
    dict(
        n_layers=2,
        d_model=32,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        d_mlp=64,
        vocab_size=61,
        attention="naive",
        max_position=64,
    )
)
PROMPTS = [[3, 9, 4], [7, 1, 8, 2, 8, 1, 8], [5, 5], [11, 12, 13, 14, 15]]
CAPACITY = 32


@pytest.fixture(scope="module")
def params():
    """Three policy versions: an initialisation and two perturbations of it."""
    base = jax.jit(params_model(CFG).init, static_argnums=0)(0)
    rng = np.random.default_rng(0)
    return [base] + [
        jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), base) for _ in range(2)
    ]


def trajectories() -> list[Trajectory]:
    return [Trajectory(i, list(p)) for i, p in enumerate(PROMPTS)]


def test_chunked_and_unchunked_greedy_rollouts_are_identical(params):
    probe = trajectories()
    rollout(
        CFG,
        params[0],
        probe,
        chunk_tokens=12,
        max_response_tokens=12,
        stop_ids=[],
        sampling=Sampling(),
        seed=0,
    )
    stop = probe[1].response[6]  # a token row 1 emits mid-way: some rows stop early, others run to the limit
    runs = {}
    for chunk in (12, 5, 3):
        ts = trajectories()
        runs[chunk] = (
            rollout(
                CFG,
                params[0],
                ts,
                chunk_tokens=chunk,
                max_response_tokens=12,
                stop_ids=[stop],
                sampling=Sampling(),
                seed=0,
            ),
            ts,
        )
    assert runs[12][0] == 1 and runs[3][0] == 4
    full = runs[12][1]
    assert any(not t.truncated for t in full) and any(t.truncated for t in full)
    for _, ts in (runs[5], runs[3]):
        for a, b in zip(full, ts):
            assert a.response == b.response and a.truncated == b.truncated
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


def test_a_trajectory_cut_into_three_chunks_keeps_its_cached_logprobs_and_versions(params):
    """Chunk k is decoded by params[k] (policy version k); earlier chunks keep the log-probs of their policy."""
    ts = trajectories()
    snapshots = []
    for version in range(3):
        rollout_chunk(
            CFG,
            params[version],
            ts,
            chunk_tokens=4,
            max_response_tokens=12,
            stop_ids=[],
            sampling=Sampling(),
            key=jax.random.key(0),
            version=version,
        )
        snapshots.append([list(t.logprobs) for t in ts])
    for t in ts:
        assert t.finished and t.truncated and len(t.response) == 12
        assert t.versions == [0] * 4 + [1] * 4 + [2] * 4
    for k in range(3):
        for row in range(len(ts)):
            assert snapshots[2][row][: 4 * (k + 1)] == snapshots[k][row]  # cached, never recomputed
    # independently: teacher-forced log-probs of each chunk's tokens under the params that sampled it
    rows = training_rows(ts, [0.0] * len(ts), seq_len=CAPACITY, overlong_filter=False)
    teacher = jax.jit(lambda p, b: token_logprobs(params_model(CFG).bind(p), b))
    for k in range(3):
        logp = np.asarray(teacher(params[k], rows))
        for row, t in enumerate(ts):
            first = len(t.prompt) - 1 + 4 * k
            np.testing.assert_allclose(t.logprobs[4 * k : 4 * k + 4], logp[row, first : first + 4], atol=1e-4)


def length_reward(text: str, item: dict) -> float:
    """A reward random tiny models earn unevenly (RL's groups need varied rewards to train)."""
    return (len(text) % 3) / 2


RL_ARGS = {
    "data.seq_len": 40,
    "train.steps": 4,
    "train.batch_size": 8,
    "rl.group_size": 4,
    "rl.prompts_per_step": 2,
    "rl.chunk_tokens": 4,
    "rl.max_prompt_tokens": 32,
    "rl.max_response_tokens": 8,
    "rl.overlong_filter": False,
    "rl.ref_refresh_steps": 3,
    "rl.kl_beta": 0.01,
    "optimizer.lr": 1e-3,
    "schedule.warmup_steps": 0,
    "schedule.decay_steps": 0,
    "checkpoint.every_steps": 2,
    "checkpoint.async_save": False,
    "model.attention": "naive",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=VOCAB, num_docs=40)


KILLED = """
import os, pathlib, signal, sys, jax
from mct.config.posttrain import RLRunConfig
from mct.posttrain import rl
from tests.test_rl import RL_ARGS, length_reward
from tests.tiny_runs import make_config
workdir, dataset = sys.argv[1:]
marker = pathlib.Path(workdir) / "checkpoints" / "2" / "commit_success.txt"
def killing_reward(text, item):
    if marker.exists():  # mid-step 3, after checkpoint 2 was committed
        os.kill(os.getpid(), signal.SIGKILL)
    return length_reward(text, item)
config = make_config(workdir, pathlib.Path(dataset), RLRunConfig, **RL_ARGS)
rl.train(config, devices=jax.devices()[:1], reward=killing_reward)
"""


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, dataset):
    """The run SIGKILLed in step 3, started in a child process (it runs while the reference run trains)."""
    workdir, log = tmp_path_factory.mktemp("killed"), tmp_path_factory.mktemp("killed_log") / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED, str(workdir), str(dataset)], cwd=REPO, env=env, stderr=stderr
        )
    yield workdir, proc, log
    proc.kill()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, dataset, killed_run):
    workdir = tmp_path_factory.mktemp("reference")
    rl.train(make_config(workdir, dataset, RLRunConfig, **RL_ARGS), devices=ONE, reward=length_reward)
    return workdir


def metric_lines(workdir) -> list[dict]:
    lines = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.endswith("_s")} for m in lines]  # timings differ


def test_rl_run_trains_on_completed_groups_and_carries_unfinished_ones(reference_run):
    lines = metric_lines(reference_run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert lines[0]["chunk_carried"] == 8 and lines[0]["completed_groups"] == 0  # 2 groups x 4, one chunk in
    for m in lines[1:]:  # each step: the previous step's groups finish, the new ones are carried
        assert m["completed_groups"] == 2 and m["chunk_carried"] == 8
        assert {"reward_mean", "accepted_groups", "kl", "loss"} <= m.keys()
    assert any(m.get("loss_tokens", 0) > 0 for m in lines)
    ckpt = Checkpointer(str(reference_run), read_only=True)
    assert ckpt.all_steps() == [2, 4]
    saved = ckpt.manager.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    ckpt.close()
    buffer = [Trajectory(**t) for t in saved["buffer"]]
    assert sorted(t.group for t in buffer) == [2] * 4 + [3] * 4  # step 2's new groups, one chunk in
    for t in buffer:  # a chunk of 4 tokens from version 1, or fewer where a sampled stop token ended it
        assert t.versions == [1] * len(t.response) and len(t.logprobs) == len(t.response), t
        assert (len(t.response) == 4 and not t.finished) or (t.finished and not t.truncated), t


def test_resume_after_sigkill_gives_the_same_rollouts_and_losses(dataset, reference_run, killed_run):
    workdir, proc, log = killed_run
    assert proc.wait(timeout=600) == -9, log.read_text()[-2000:]
    assert Checkpointer(str(workdir), read_only=True).all_steps() == [2]
    rl.train(make_config(workdir, dataset, RLRunConfig, **RL_ARGS), devices=ONE, reward=length_reward)
    assert metric_lines(workdir) == metric_lines(reference_run)
    a, b = RunCheckpoint(str(workdir)).read_params(), RunCheckpoint(str(reference_run)).read_params()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_export_works_on_an_rl_workdir(tmp_path, reference_run):
    out = export(str(reference_run), str(tmp_path / "hf"), "minicpm")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_rl_cli_logs_eval_loss_every_eval_steps(tmp_path, dataset, reference_run):
    """python -m mct.rl evaluates like every run: the policy's held-out token loss on init_from's data."""
    settings = overrides(dataset, **{**RL_ARGS, "train.steps": 2, "eval.every_steps": 2})
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mct.rl",
            "--config",
            str(REPO / "experiments/configs/tiny_cpu_rl.py"),
            f"--config.workdir={tmp_path}",
            f"--config.init_from={reference_run}",
            *[f"--config.{k}={v}" for k, v in settings.items()],
        ],
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    evals = [m for m in metric_lines(tmp_path) if "eval_loss" in m]
    assert (
        [m["step"] for m in evals] == [2] and np.isfinite(evals[0]["eval_loss"]) and evals[0]["eval_loss"] > 0
    )


def test_a_checkpoint_config_with_the_old_rl_and_dpo_sections_still_loads(tmp_path, params):
    """Checkpoints saved before the config split by consumer carry `rl` (with its lr) and `dpo` in every run's
    config: reading a run drops them; RL's own class keeps its section; unknown keys stay errors."""
    config = Config(workdir=str(tmp_path), model=CFG)
    sections = {
        "dpo": {"path": ["default"], "beta": 0.1, "sft_weight": 0.0},
        "rl": {"group_size": 8, "lr": 1e-5},
    }
    old = {**config.to_dict(), **sections}
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(
        0,
        {"params": params[0], "opt_state": {}},
        None,
        {"config": old, "model_signature": model_signature(CFG), "step": 0},
    )
    ckpt.wait()
    ckpt.close()
    assert RunCheckpoint(str(tmp_path)).config == config
    assert read_init_source(str(tmp_path)).config == config.resolve()
    with_rl = {**config.to_dict(), "rl": {"group_size": 8}, "dpo": sections["dpo"]}
    assert RLRunConfig.from_saved(with_rl).rl.group_size == 8
    with pytest.raises(ConfigError, match="unknown config key (dpo|rl)"):
        Config.from_dict(old)  # a run's own config file may not name another entry point's section
    with pytest.raises(ConfigError, match="unknown config key optimiser"):
        Config.from_saved({**old, "optimiser": {}})


def test_bad_rl_config_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mct.rl",
            "--config",
            str(REPO / "experiments/configs/tiny_cpu_rl.py"),
            f"--config.workdir={tmp_path}",
            "--config.rl.reward=bogus",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "rl.reward='bogus'" in proc.stderr and "Traceback" not in proc.stderr


def letter_e_reward(text: str, item: dict) -> float:
    """A reward a tiny random model can learn: the share of 8 tokens' worth of the letter "e" in its answer."""
    return min(1.0, text.count("e") / 8)


def test_rl_raises_the_reward_mean_on_a_learnable_reward(tmp_path, dataset):
    """Six steps on letter_e_reward, 4 prompts x 8 answers a step, whole answers each step (chunk_tokens =
    max_response_tokens). Noise, measured with lr 1e-12: one step's reward_mean lies between 0.004 and 0.043
    (std 0.013), so the last three steps' mean minus the first two's has a std near 0.012. Measured with lr
    5e-3 (two datasets): rises of 0.26 and 0.90 (1e-2 learnt faster but one run collapsed to reward 0).
    A margin of 0.15, over ten times the noise, is learning."""
    settings = {**RL_ARGS, "train.steps": 6, "rl.chunk_tokens": 8, "optimizer.lr": 5e-3}
    settings |= {"rl.group_size": 8, "rl.prompts_per_step": 4, "train.batch_size": 32}
    settings |= {"checkpoint.every_steps": 6, "eval.every_steps": 6}
    rl.train(make_config(tmp_path, dataset, RLRunConfig, **settings), devices=ONE, reward=letter_e_reward)
    rewards = [m["reward_mean"] for m in metric_lines(tmp_path) if "reward_mean" in m]
    print("reward_mean by step", [round(r, 3) for r in rewards])
    assert len(rewards) == 6 and np.mean(rewards[-3:]) - np.mean(rewards[:2]) > 0.15, rewards
