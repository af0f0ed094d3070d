"""DPO: the loss against NumPy, log 2 at init (policy == reference), packed pair rows give each answer's own
log-prob, and the CLI resumes exactly from a checkpoint and exports."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipelines.chat import encode_chat
from data_pipelines.loader import dataset_tokenizer
from data_pipelines.prepare import is_eval_document
from mct.config.posttrain import DPORunConfig
from mct.export.hf_export import export
from mct.model.decoder import ParamsModel
from mct.model.loss import token_losses
from mct.posttrain.dpo import PreferenceData, dpo_objective, dpo_terms, sequence_logps, train_dpo
from mct.posttrain.preference import pair_rows
from mct.run.checkpoint import Checkpointer
from mct.run.training_run import initial_state
from mct.train.trainer import build
from tests.tiny_runs import REPO, losses, make_config, overrides, resume_copy

ONE = jax.devices()[:1]
SEQ = 96


@pytest.fixture(scope="module")
def source(tmp_path_factory, pretrained):
    """A 2-step pre-training workdir, its dataset and a preference file."""
    root = tmp_path_factory.mktemp("dpo")
    workdir, dataset = pretrained
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(40):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        chosen, rejected = ({"role": "assistant", "content": f"{v}"} for v in (a + b, a + b + 1 + i % 3))
        pairs.append(
            {
                "prompt": [{"role": "user", "content": f"q{i}: {a} + {b}?"}],
                "chosen": chosen,
                "rejected": rejected,
            }
        )
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return workdir, dataset, path, pairs


def test_dpo_loss_matches_numpy():
    rng = np.random.default_rng(0)
    policy, reference = rng.normal(-20, 5, (16, 2)), rng.normal(-20, 5, (16, 2))
    loss, margin = dpo_terms(policy.astype(np.float32), reference.astype(np.float32), 0.1)
    expected_margin = 0.1 * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    np.testing.assert_allclose(margin, expected_margin, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, np.logaddexp(0.0, -expected_margin), rtol=1e-5)  # -log sigmoid


def test_packed_pairs_at_init_give_log2_and_each_answers_logprob(source):
    workdir, dataset, path, pairs = source
    tokenizer = dataset_tokenizer(dataset)
    split = pair_rows((str(path),), tokenizer, seq_len=SEQ, eval_fraction=0.2)
    rows = split["train"]
    train_pairs = [p for i, p in enumerate(pairs) if not is_eval_document(f"{path}:{i + 1}", 0.2)]
    assert len(rows["tokens"]) == len(train_pairs) and len(split["eval"]["tokens"]) == len(pairs) - len(
        train_pairs
    )
    config = make_config(workdir.parent / "unused", dataset)
    model = ParamsModel(dataclasses.replace(config.model, attention="naive"))
    params = model.init(0)
    batch = {k: v[:8] for k, v in rows.items()}
    logps = np.asarray(jax.jit(lambda p, b: sequence_logps(model.bind(p), b))(params, batch))  # [8, 2]
    per_token = jax.jit(lambda p, b: token_losses(model.bind(p), b))
    for i, pair in enumerate(train_pairs[:8]):
        for j, answer in enumerate(("chosen", "rejected")):
            ids, mask = encode_chat(tokenizer, [*pair["prompt"], pair[answer]])
            n = len(ids) - 1
            alone = {
                k: np.zeros((1, SEQ), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")
            }
            alone["tokens"][0, :n], alone["targets"][0, :n] = ids[:-1], ids[1:]
            alone["segment_ids"][0, :n], alone["positions"][0, :n] = 1, np.arange(n)
            expected = -float(np.sum(np.asarray(per_token(params, alone))[0, :n] * np.array(mask[1:])))
            assert logps[i, j] == pytest.approx(expected, rel=1e-5)
    batch["ref_logp"] = logps
    for weight in (0.0, 0.5):
        total, count, extras = jax.jit(lambda p, b, w=weight: dpo_objective(0.1, w)(model.bind(p), b))(
            params, batch
        )
        chosen_mean_loss = -logps[:, 0] / batch["loss_mask"].sum(1)
        assert float(count) == 8 and float(extras["dpo_loss"]) / 8 == pytest.approx(np.log(2), rel=1e-6)
        assert float(total) / 8 == pytest.approx(np.log(2) + weight * chosen_mean_loss.mean(), rel=1e-5)


def test_dpo_cli_resumes_exactly_and_exports(source, tmp_path):
    workdir, dataset, path, _ = source
    options = {
        "data.seq_len": SEQ,
        "dpo.path": (str(path),),
        "dpo.sft_weight": 0.5,
        "data.chat.eval_fraction": 0.2,
        "train.steps": 4,
        "checkpoint.every_steps": 2,
        "schedule.warmup_steps": 0,
        "schedule.decay_steps": 2,
        "checkpoint.async_save": False,
        "optimizer.lr": 1e-3,
        "schedule.decay_shape": "cosine",
    }
    straight = tmp_path / "straight"
    train_dpo(make_config(straight, dataset, DPORunConfig, init_from=str(workdir), **options), devices=ONE)
    first = json.loads((straight / "metrics.jsonl").read_text().splitlines()[0])
    assert first["dpo_loss"] == pytest.approx(np.log(2), rel=1e-5)  # step 1: the policy is the reference
    assert {"reward_margin", "reward_accuracy", "kl_proxy", "sft_loss"} <= first.keys()

    resumed = resume_copy(straight, tmp_path / "resumed", step=2)
    flags = [f"--config.{k}={v}" for k, v in overrides(dataset, **options).items()]
    cmd = [
        sys.executable,
        "-m",
        "mct.dpo",
        "--config",
        str(REPO / "experiments/configs/tiny_cpu_dpo.py"),
        f"--config.workdir={resumed}",
        f"--config.init_from={workdir}",
        *flags,
    ]
    done = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "XLA_FLAGS": ""}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5) and len(losses(resumed)) == 4

    out = export(str(resumed), str(tmp_path / "hf"), "minicpm")
    assert (out / "model.safetensors").is_file()


def test_dpo_learns_to_prefer_the_chosen_answers(source, tmp_path):
    """15 steps over the 32 training pairs (3.75 passes, batches of 8): the reward accuracy of each batch, taken
    before its update, rises from 0 (policy == reference: every margin 0) and the DPO loss falls from log 2."""
    workdir, dataset, path, _ = source
    options = {
        "data.seq_len": SEQ,
        "dpo.path": (str(path),),
        "dpo.sft_weight": 0.0,
        "data.chat.eval_fraction": 0.2,
        "train.steps": 15,
        "train.log_every_steps": 1,
        "checkpoint.every_steps": 15,
        "eval.every_steps": 15,
        "schedule.warmup_steps": 0,
        "schedule.decay_steps": 0,
        "checkpoint.async_save": False,
        "optimizer.lr": 3e-3,
    }
    train_dpo(make_config(tmp_path, dataset, DPORunConfig, init_from=str(workdir), **options), devices=ONE)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "reward_accuracy" in m]
    assert steps[0]["reward_accuracy"] == 0.0 and steps[0]["dpo_loss"] == pytest.approx(np.log(2), rel=1e-5)
    last = steps[-5:]  # measured: accuracy 1, 7/8, 1, 1, 1 (mean 0.975); loss 0.15-0.30 (mean 0.20)
    assert np.mean([m["reward_accuracy"] for m in last]) >= 0.75  # two wrong pairs of 8 in each last batch
    assert np.mean([m["dpo_loss"] for m in last]) < 0.5  # log 2 = 0.69 is the untrained loss


def test_dpo_from_a_run_on_the_same_data_starts_its_pairs_from_the_start(pretrained, tmp_path):
    """The README chain sft -> dpo: the source read the very data DPO's config names, and a continuation of
    its stream would be a document iterator's state where DPO's is its pairs'."""
    workdir, dataset = pretrained
    config = make_config(tmp_path / "w", dataset, init_from=str(workdir))  # the source's data settings
    setup = build(config.resolve(), ONE)
    ckpt = Checkpointer(tmp_path / "w")
    assert initial_state(setup, ckpt)[2] is not None  # pre-training on the same data continues the stream
    assert initial_state(setup, ckpt, PreferenceData.continues_source_data)[2] is None
    ckpt.close()
