"""Continuing a MiniCPM4 release at a 2-layer shape (issue 25, point 5): a release directory (the published
config keys, bf16 shards, a SentencePiece tokenizer in the release layout) is imported; data is prepared with its
tokenizer; experiments/configs/minicpm4_0p5b.py with the release's model trains 20 steps from it (init_from) and
SFT a few more; the run exports in the release format with the release's tokenizer files and imports again bit
for bit, decoding the same greedy tokens."""

import json

import jax
import numpy as np
import pytest

from data_pipelines.prepare import prepare_dataset
from data_pipelines.tokenizer import load_tokenizer
from experiments.configs import minicpm4_0p5b
from experiments.configs.base import for_run
from mct.config.run import Config
from mct.config.schema import to_dict
from mct.errors import UserError
from mct.export.hf_export import export
from mct.export.hf_import import import_hf
from mct.infer.decoding import generate
from mct.infer.generate import encode_prompts
from mct.posttrain.sft import train_sft
from mct.run.reader import RunCheckpoint
from mct.run.training_run import train
from tests.data_fixtures import make_tiny_dataset
from tests.release_format import HARD_TEXTS, write_release_tokenizer
from tests.test_release_format import release_config, release_tensors, write_release

PIECES = 400
ONE = jax.devices()[:1]
RUN = {
    "data.seq_len": 32,
    "data.eval_batches": 1,
    "data.num_logical_shards": 4,
    "train.batch_size": 4,
    "train.grad_accum": 1,
    "train.steps": 20,
    "train.log_every_steps": 5,
    "schedule.warmup_fraction": 0.1,
    "schedule.decay_fraction": 0.2,
    "eval.every_steps": 10,
    "checkpoint.every_steps": 10,
    "mesh.fsdp": 1,
    "optimizer.lr": 0.003,
}


def release_run_config(workdir, dataset, model: dict, run_class: type[Config] = Config, **extra) -> Config:
    """experiments/configs/minicpm4_0p5b.py with the imported release's model (the 2-layer shape) and a tiny
    data/step budget."""
    c = for_run(minicpm4_0p5b.get_config(), run_class)
    values = {**RUN, **extra, "data.mixture": {"release": {"path": str(dataset), "weight": 1.0}}}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.workdir = str(workdir)
    d = c.to_dict()
    d["model"] = model
    return run_class.from_dict(d)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release directory; its tokenizer is the release layout's SentencePiece one."""
    directory = tmp_path_factory.mktemp("r") / "release"
    config = release_config(vocab_size=PIECES + 8, eos_token_id=[2, PIECES])
    write_release(directory, config, release_tensors(config))
    (directory / "tokenizer.json").unlink()
    write_release_tokenizer(directory, PIECES)
    return directory


def greedy(workdir, prompt: str) -> list[int]:
    run = RunCheckpoint(workdir)
    ids = encode_prompts(run.tokenizer(), [prompt], chat=True)
    return generate(run.model_cfg, run.read_params(), ids, max_new_tokens=6)[0]


def test_import_train_sft_export_reimport(release, tmp_path, monkeypatch):
    imported = import_hf(release, tmp_path / "imported")
    assert load_tokenizer(imported).fingerprint == load_tokenizer(release).fingerprint
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        "".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i in range(60) for t in HARD_TEXTS[:4])
    )
    dataset = prepare_dataset(
        tmp_path / "ds",
        [str(docs)],
        tokenizer_path=str(release),
        eval_fraction=0.1,
        workers=1,
        progress=False,
    )
    model = to_dict(RunCheckpoint(imported).config.model)

    trained = tmp_path / "trained"
    train(release_run_config(trained, dataset, model, init_from=str(imported)), devices=ONE)
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]  # it learned from the release's weights
    assert (trained / "tokenizer.model").read_bytes() == (release / "tokenizer.model").read_bytes()

    monkeypatch.setenv("MCT_CACHE", str(tmp_path / "cache"))
    chat = {
        "data.chat.path": ("default",),
        "data.seq_len": 64,
        "train.steps": 4,
        "schedule.warmup_fraction": 0.0,
    }
    train_sft(
        release_run_config(tmp_path / "sft", dataset, model, init_from=str(trained), **chat), devices=ONE
    )
    assert load_tokenizer(tmp_path / "sft").fingerprint == load_tokenizer(release).fingerprint

    out = export(trained, tmp_path / "export", "minicpm")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (release / name).read_bytes(), name
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, PIECES]
    again = import_hf(out, tmp_path / "reimported")
    first, second = RunCheckpoint(trained).read_params(), RunCheckpoint(again).read_params()
    assert all(np.array_equal(first[name], value) for name, value in second.items())
    assert greedy(trained, "Hello 你好") == greedy(again, "Hello 你好")


def test_data_of_another_tokenizer_is_refused(release, tmp_path):
    """init_from a release onto data prepared with another vocabulary: one error naming both."""
    imported = import_hf(release, tmp_path / "imported")
    dataset = make_tiny_dataset(tmp_path / "bpe", vocab_size=300)
    model = to_dict(RunCheckpoint(imported).config.model)
    config = release_run_config(tmp_path / "wd", dataset, model, init_from=str(imported))
    with pytest.raises(
        UserError, match="its tokenizer \\(sentencepiece, 408 ids\\) is not the one .* \\(bpe, 300 ids\\)"
    ):
        train(config, devices=ONE)
