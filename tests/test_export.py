"""Export -> import -> export is bit-identical in both layouts; the imported workdir trains on; bad input fails
clearly and leaves nothing behind."""

import filecmp
import json
import math
import pathlib

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from data_pipelines.freq_vocab import build_freq_vocab
from experiments.configs.tiny_cpu import get_config
from mct.config.run import Config
from mct.export.hf_export import FREQ_VOCAB_FILE, INDEX_FILE, export, hf_layout
from mct.export.hf_import import import_hf
from mct.infer.decoding import params_model
from mct.model.decoder import width_multiplier
from mct.run.checkpoint import Checkpointer, model_signature
from mct.run.reader import RunCheckpoint
from mct.run.training_run import train
from tests.data_fixtures import make_tiny_dataset


def tiny_run_dict(workdir, dataset, **model_overrides):
    c = get_config()
    c.workdir = str(workdir)
    c.model.update(
        dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=96, vocab_size=320)
    )
    c.model.attention = "naive"
    c.model.update(model_overrides)
    c.data.mixture.default.path = str(dataset)
    c.data.seq_len, c.data.num_logical_shards, c.data.eval_batches = 64, 2, 1
    c.train.steps, c.train.batch_size = 3, 8  # 8 simulated devices (conftest)
    c.schedule.warmup_steps, c.schedule.decay_steps = 1, 1
    c.eval.every_steps = c.checkpoint.every_steps = 3
    return c


def tiny_run_config(workdir, dataset, **model_overrides) -> Config:
    return Config.from_dict(tiny_run_dict(workdir, dataset, **model_overrides).to_dict())


def random_params(model_cfg, seed: int = 0) -> dict:
    """Random weights shaped like ParamsModel's (muP init scales, norms around 1), drawn in NumPy: fast."""
    rng = np.random.default_rng(seed)
    hidden_std = model_cfg.init_std / math.sqrt(width_multiplier(model_cfg))
    params = {}
    for name, x in params_model(model_cfg).abstract().items():
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if name.endswith("norm"):
            params[name] = 1.0 + 0.3 * noise
        else:
            params[name] = noise * np.float32(model_cfg.init_std if name == "embed" else hidden_std)
    return params


def save_random_run(workdir, config, seed=0, saved_config: dict | None = None) -> dict:
    """A checkpoint of random params in the train layout, without training (meta records saved_config)."""
    params = random_params(config.model, seed)
    ckpt = Checkpointer(str(workdir), async_save=False)
    saved = saved_config or config.to_dict()
    meta = {"config": saved, "model_signature": model_signature(config.model), "step": 7}
    ckpt.save(7, {"params": params, "opt_state": {}}, None, meta)
    ckpt.wait()
    ckpt.close()
    return params


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=300)


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, dataset):
    """A saved run (random weights) for the tests that only need some checkpoint."""
    config = tiny_run_config(tmp_path_factory.mktemp("run") / "wd", dataset)
    save_random_run(config.workdir, config)
    return config


LONGROPE = {
    "type": "longrope",
    "original_max_position": 16,
    "theta": 10000.0,
    "short_factor": tuple(1.0 + 0.1 * i for i in range(8)),
    "long_factor": tuple(1.0 + 0.5 * i for i in range(8)),
}
VARIANTS = {
    "untied-mqa-longrope-sparse": dict(
        tie_embeddings=False, n_kv_heads=1, rope=LONGROPE, max_position=64, attention="infllm_v2"
    ),
    "sp-tied-bf16": dict(parametrization="sp", n_kv_heads=4),
}


@pytest.mark.parametrize("layout", hf_layout.LAYOUTS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_bit_identical(tmp_path, dataset, layout, variant):
    config = tiny_run_config(tmp_path / "wd", dataset, **VARIANTS[variant])
    params = save_random_run(tmp_path / "wd", config)
    dtype = "bfloat16" if "bf16" in variant else "float32"
    sharded = dict(dtype=dtype, max_shard_bytes=20_000, allow_dense=True)  # llama runs the sparse one densely
    first = export(tmp_path / "wd", tmp_path / "a", layout, **sharded)
    index = json.loads((first / INDEX_FILE).read_text())
    plan = hf_layout.tensor_plan(config.model, layout)
    assert sorted(index["weight_map"]) == sorted(s.name for s in plan)
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    workdir = import_hf(first, tmp_path / "imported", unfold_mup=True, config=config)
    second = export(workdir, tmp_path / "b", layout, **sharded)
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
    assert mismatch == errors == []
    imported = RunCheckpoint(workdir).read_params()
    for name, value in params.items():  # unfolding may pick a neighbouring float with the same folded image
        tol = 1e-2 if dtype == "bfloat16" else 1e-6
        np.testing.assert_allclose(imported[name], value, rtol=tol, atol=tol, err_msg=name)


def test_layouts_hold_the_documented_tensors(tmp_path, dataset):
    config = tiny_run_config(tmp_path / "wd", dataset, tie_embeddings=False)
    params = save_random_run(tmp_path / "wd", config)
    cfg = config.model
    m = cfg.d_model / cfg.dim_model_base
    branch = cfg.scale_depth / math.sqrt(cfg.n_layers)
    freq = tmp_path / "freq.json"
    freq.write_text(json.dumps(build_freq_vocab(dataset, 32)))
    out = {
        layout: export(tmp_path / "wd", tmp_path / layout, layout, freq_vocab=freq)
        for layout in hf_layout.LAYOUTS
    }
    with (
        safe_open(out["minicpm"] / "model.safetensors", "np") as mini,
        safe_open(out["llama"] / "model.safetensors", "np") as llama,
    ):
        q = mini.get_tensor("model.layers.1.self_attn.q_proj.weight")  # [heads * head_dim, d] = W^T
        np.testing.assert_array_equal(q, params["wq"][1].reshape(cfg.d_model, -1).T)
        o = mini.get_tensor("model.layers.0.self_attn.o_proj.weight")
        np.testing.assert_array_equal(o, params["wo"][0].reshape(-1, cfg.d_model).T)
        np.testing.assert_array_equal(mini.get_tensor("lm_head.weight"), params["lm_head"].T)
        np.testing.assert_allclose(
            llama.get_tensor("model.embed_tokens.weight"), params["embed"] * 12.0, rtol=1e-6
        )
        np.testing.assert_allclose(
            llama.get_tensor("model.layers.0.mlp.down_proj.weight"), params["w_down"][0].T * branch, rtol=1e-6
        )
        np.testing.assert_allclose(llama.get_tensor("lm_head.weight"), params["lm_head"].T / m, rtol=1e-6)
    mini_cfg = json.loads((out["minicpm"] / "config.json").read_text())
    assert (mini_cfg["scale_emb"], mini_cfg["scale_depth"], mini_cfg["dim_model_base"]) == (12.0, 1.4, 256)
    assert mini_cfg["architectures"] == ["MiniCPMForCausalLM"] and mini_cfg["sparse_config"] is None
    llama_cfg = json.loads((out["llama"] / "config.json").read_text())
    assert llama_cfg["architectures"] == ["LlamaForCausalLM"] and "scale_emb" not in llama_cfg
    generation = json.loads((out["llama"] / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": [2, 4], "pad_token_id": 0}  # EOS, <|im_end|>
    assert tokenizer_less_post_processor(out["llama"]) == tokenizer_less_post_processor(dataset)
    assert (out["minicpm"] / FREQ_VOCAB_FILE).read_bytes() == freq.read_bytes()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_unfold_finds_a_preimage_for_every_constraint(dtype):
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    fold = lambda scale: (x * np.float32(scale)).astype(dtype)
    for scale in (12.0, 1.4 / math.sqrt(3)):
        np.testing.assert_array_equal(
            fold_with(hf_layout.unfold([(fold(scale), scale)]), scale, dtype), fold(scale)
        )
    # A tied embedding exported twice (x 12 as embed_tokens, x 1/m as lm_head): dividing one of them back
    # breaks the other for many elements; unfold must satisfy both, as the original weights do.
    constraints = [(fold(12.0), 12.0), (fold(1 / 0.75), 1 / 0.75)]
    naive = np.asarray(constraints[0][0], np.float32) / np.float32(12.0)
    assert (fold_with(naive, 1 / 0.75, dtype) != constraints[1][0]).mean() > 0.01
    both = hf_layout.unfold(constraints)
    for y, scale in constraints:
        np.testing.assert_array_equal(fold_with(both, scale, dtype), y)


def tokenizer_less_post_processor(directory) -> dict:
    """DIRECTORY/tokenizer.json without its post-processor (export adds one that prepends BOS)."""
    tokenizer = json.loads((pathlib.Path(directory) / "tokenizer.json").read_text())
    del tokenizer["post_processor"]
    return tokenizer


def fold_with(x, scale, dtype):
    return (x * np.float32(scale)).astype(dtype)


def test_imported_llama_export_trains_on_from_its_weights(tmp_path, run_config):
    hf = export(run_config.workdir, tmp_path / "hf", "llama")
    workdir = import_hf(hf, tmp_path / "imported", unfold_mup=True, config=run_config)
    imported = RunCheckpoint(workdir).read_params()
    for name, value in RunCheckpoint(run_config.workdir).read_params().items():
        np.testing.assert_allclose(imported[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    resumed = tiny_run_dict(workdir, run_config.data.mixture["default"].path)
    resumed.train.steps = resumed.eval.every_steps = resumed.checkpoint.every_steps = 1
    resumed.schedule.warmup_steps = 0
    resumed.optimizer.lr = (
        1e-30  # an update far below every weight's ulp: step 1 holds the weights train started from
    )
    result = train(Config.from_dict(resumed.to_dict()))
    assert result["step"] == 1 and np.isfinite(result["eval_loss"])
    assert Checkpointer(str(workdir), read_only=True).all_steps() == [0, 1]
    after = RunCheckpoint(workdir, step=1).read_params()
    for name, value in imported.items():
        np.testing.assert_array_equal(after[name], value, err_msg=name)
    # The run's data state names its tokenizer: a different WORKDIR/tokenizer.json is passed over.
    other = make_tiny_dataset(tmp_path / "other", vocab_size=290, tag="other")
    (workdir / "tokenizer.json").write_bytes((other / "tokenizer.json").read_bytes())
    again = export(workdir, tmp_path / "again", "minicpm")
    dataset_dir = run_config.data.mixture["default"].path
    assert tokenizer_less_post_processor(again) == tokenizer_less_post_processor(dataset_dir)


def test_export_refuses_bad_input_and_leaves_nothing(tmp_path, run_config, monkeypatch):
    config = run_config
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoints/ directory"):
        export(tmp_path / "empty", tmp_path / "o1", "minicpm")
    (tmp_path / "uncommitted" / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        export(tmp_path / "uncommitted", tmp_path / "o2", "minicpm")
    with pytest.raises(FileNotFoundError, match="no committed checkpoint at step 999"):
        export(config.workdir, tmp_path / "o3", "minicpm", step=999)  # the run has step 7 only
    with pytest.raises(ValueError, match="unknown layout"):
        export(config.workdir, tmp_path / "o4", "gpt2")
    (tmp_path / "freq.json").write_text(json.dumps({"format": "mct-freq-vocab", "ids": [1, 5000]}))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        export(config.workdir, tmp_path / "o6", "minicpm", freq_vocab=tmp_path / "freq.json")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(config.workdir, taken, "llama")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(hf_layout, "to_hf", broken)
    with pytest.raises(OSError, match="disk full"):
        export(config.workdir, tmp_path / "o5", "llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "freq.json", "taken", "uncommitted"]


def test_import_refuses_bad_input(tmp_path, run_config):
    hf = export(run_config.workdir, tmp_path / "hf", "minicpm", max_shard_bytes=20_000)
    with pytest.raises(ValueError, match="config.json"):
        import_hf(tmp_path, tmp_path / "w1")
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\)"):
        import_hf(hf, tmp_path / "w2")
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        import_hf(hf, tmp_path / "w3")
    (hf / "config.json").write_text(json.dumps(cfg))
    index = json.loads((hf / INDEX_FILE).read_text())
    del index["weight_map"]["model.norm.weight"]
    (hf / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks the tensor 'model.norm.weight'"):
        import_hf(hf, tmp_path / "w4")
    minicpm_only = ("scale_emb", "scale_depth", "dim_model_base", "sparse_config")
    llama_cfg = {k: v for k, v in cfg.items() if k not in minicpm_only}
    (hf / "config.json").write_text(
        json.dumps({**llama_cfg, "model_type": "llama"})
    )  # no muP record to unfold
    with pytest.raises(ValueError, match="lacks the field 'mct_folded_mup'"):
        import_hf(hf, tmp_path / "w5", unfold_mup=True)
    assert not any(p.name.startswith(("w", ".w")) for p in tmp_path.iterdir())


def test_import_refuses_malformed_files(tmp_path, run_config):
    """A config.json that is not an object or has no attention heads, and a truncated safetensors file, are
    ValueErrors naming the file or field (mct.import_hf prints them as one `error:` line), not tracebacks."""
    hf = export(run_config.workdir, tmp_path / "hf", "minicpm")
    config, weights = hf / "config.json", hf / "model.safetensors"
    cfg = json.loads(config.read_text())
    for bad, error in (
        ([cfg], "config.json must hold a JSON object"),
        ({**cfg, "num_attention_heads": 0}, "config field 'num_attention_heads' must be a positive integer"),
    ):
        config.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=error):
            import_hf(hf, tmp_path / "w")
    config.write_text(json.dumps(cfg))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        import_hf(hf, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_run_saved_before_a_model_setting_existed_still_reads(tmp_path, dataset):
    """A checkpoint whose saved model config predates a settings key (here scan_layers) reads with the default."""
    config = tiny_run_config(tmp_path / "wd", dataset)
    saved = config.to_dict()
    del saved["model"]["scan_layers"]
    params = save_random_run(config.workdir, config, saved_config=saved)
    run = RunCheckpoint(config.workdir)
    assert run.model_cfg.scan_layers is True
    np.testing.assert_array_equal(run.read("wq"), params["wq"])
