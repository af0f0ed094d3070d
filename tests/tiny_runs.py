"""The tiny training run tests share: config overrides usable in-process and as CLI flags, metric readers."""

import json
import pathlib
import shutil
import sys

from experiments.configs import tiny_cpu
from experiments.configs.base import for_run
from mct.config.run import Config
from mct.run.checkpoint import Checkpointer, model_signature
from mct.run.training_run import train
from tests.data_fixtures import make_tiny_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 320


# The tiny run every test trains: overrides of experiments/configs/tiny_cpu.py, usable in-process and as CLI flags.
def overrides(dataset: pathlib.Path, **extra) -> dict:
    o = {
        "model.n_layers": 2,
        "model.d_model": 64,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.head_dim": 16,
        "model.d_mlp": 128,
        "model.vocab_size": VOCAB,
        "data.mixture.default.path": str(dataset),
        "data.seq_len": 32,
        "data.eval_batches": 2,
        "data.num_logical_shards": 8,
        "train.batch_size": 8,
        "train.steps": 10,
        "train.log_every_steps": 1,
        "schedule.warmup_steps": 2,
        "schedule.decay_steps": 3,
        "eval.every_steps": 5,
        "checkpoint.every_steps": 5,
        "checkpoint.max_to_keep": 10,
        "mesh.data": 1,
    }
    o.update(extra)
    return o


def make_config(workdir, dataset, run_class: type[Config] = Config, **extra) -> Config:
    """The tiny run's `run_class` (pre-training's Config or a post-training entry point's) with `extra`."""
    c = for_run(tiny_cpu.get_config(), run_class)
    for key, value in overrides(dataset, **extra).items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.workdir = str(workdir)
    return run_class.from_dict(c.to_dict())


def train_flags(workdir, dataset, **extra) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in overrides(dataset, **extra).items()]
    return ["--config", str(REPO / "experiments/configs/tiny_cpu.py"), f"--config.workdir={workdir}", *flags]


def cli(workdir, dataset, **extra) -> list[str]:
    return [sys.executable, "-m", "mct.train", *train_flags(workdir, dataset, **extra)]


def losses(workdir) -> dict[int, float]:
    """step -> train loss from metrics.jsonl (a resumed run's later lines win)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def first_metrics(workdir) -> dict:
    return json.loads((pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()[0])


def resume_copy(workdir, target, step: int) -> pathlib.Path:
    """A copy of `workdir` as if the run had stopped at checkpoint `step` (later checkpoints removed)."""
    shutil.copytree(workdir, target)
    for later in (pathlib.Path(target) / "checkpoints").iterdir():
        if later.name.isdigit() and int(later.name) > step:
            shutil.rmtree(later)
    return pathlib.Path(target)


def pretrain_source(root: pathlib.Path, devices) -> tuple[pathlib.Path, pathlib.Path]:
    """(workdir, dataset) of a 2-step tiny pre-training run: the init_from of post-training tests."""
    dataset = make_tiny_dataset(root / "data", vocab_size=VOCAB, num_docs=60)
    source = {
        "train.steps": 2,
        "schedule.warmup_steps": 0,
        "schedule.decay_steps": 1,
        "checkpoint.every_steps": 2,
        "eval.every_steps": 2,
        "checkpoint.async_save": False,
    }
    train(make_config(root / "pretrain", dataset, **source), devices=devices)
    return root / "pretrain", dataset


def save_params_run(workdir, config: Config, params: dict, step: int = 0) -> pathlib.Path:
    """A workdir whose one checkpoint holds `params` under `config` (no optimizer or data state, as an import
    leaves it): a variant of a trained run with other model settings, without training it again."""
    ckpt = Checkpointer(str(workdir), async_save=False)
    meta = {"config": config.to_dict(), "model_signature": model_signature(config.model), "step": step}
    ckpt.save(step, {"params": params, "opt_state": {}}, None, meta)
    ckpt.wait()
    ckpt.close()
    return pathlib.Path(workdir)
