"""OpenBMB's release format (MiniCPM4 on the Hub) in and out: a release directory built here (the published
config.json keys at a 2-layer shape, bf16 safetensors in two shards with an index) imports, exports as
`--format minicpm` with the release's keys and values, and imports again bit for bit; sparse_config's topk maps
so that mct attends OpenBMB's set of blocks; fields mct cannot honour are refused by name, before anything is
written."""

import dataclasses
import importlib
import json
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from data_pipelines.tokenizer import train_bpe_tokenizer
from experiments.configs import minicpm4_0p5b
from mct.config.model import RopeConfig, SparseSettings
from mct.config.run import Config
from mct.export import hf_layout, openbmb
from mct.export.hf_export import INDEX_FILE, export
from mct.export.hf_import import import_hf
from mct.run.reader import RunCheckpoint
from pallas_kernels.infllm_v2.selection import _top_blocks

HEAD_DIM = 16
FACTORS = [
    1.0004,
    1.07,
    1.3,
    2.2,
    4.8,
    11.28,
    27.72,
    49.85,
]  # head_dim / 2 LongRoPE factors, like the release's
# The 8B release's sparse_config at a small scale: 2 window blocks, top-3 beside them.
SPARSE = {
    "kernel_size": 8,
    "kernel_stride": 4,
    "init_blocks": 1,
    "block_size": 16,
    "window_size": 32,
    "topk": 3,
    "use_nope": False,
    "dense_len": 64,
}
METADATA = ("_name_or_path", "transformers_version", "use_cache")  # provenance, not written back


def release_config(**overrides) -> dict:
    """config.json with the keys openbmb/MiniCPM4-0.5B publishes (no model_type, no tie_word_embeddings), a
    small shape; eos: </s> and <|im_end|> of the test tokenizer (2 and 4, as 2 and 73440 in the release)."""
    config = {
        "_name_or_path": "openbmb/MiniCPM4-0.5B",
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModel": "modeling_minicpm.MiniCPMModel",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
            "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
            "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
        },
        "bos_token_id": 1,
        "eos_token_id": [2, 4],
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "rope_type": "longrope",
            "long_factor": FACTORS,
            "short_factor": FACTORS,
            "original_max_position_embeddings": 32768,
        },
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "vocab_size": 288,
        "scale_emb": 12,
        "dim_model_base": 256,
        "scale_depth": 1.4,
    }
    return {**config, **overrides}


def release_tensors(config: dict) -> dict[str, np.ndarray]:
    """Random bf16 tensors under the names and [out, in] shapes of OpenBMB's MiniCPMForCausalLM."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * HEAD_DIM, config["num_key_value_heads"] * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        layer = {
            "input_layernorm": (d,),
            "post_attention_layernorm": (d,),
            "self_attn.q_proj": (q, d),
            "self_attn.k_proj": (kv, d),
            "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q),
            "mlp.gate_proj": (f, d),
            "mlp.up_proj": (f, d),
            "mlp.down_proj": (d, f),
        }
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (v, d)
    rng = np.random.default_rng(0)
    return {
        name: (0.1 * rng.standard_normal(shape)).astype(ml_dtypes.bfloat16) for name, shape in shapes.items()
    }


def write_release(directory, config: dict, tensors: dict | None = None) -> None:
    """The release directory: config.json, two bf16 shards and their index, a tokenizer (the tokenizer format is
    not this file's subject: a small BPE one)."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    if tensors is None:
        return
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        save_file({name: tensors[name] for name in members}, str(directory / file), metadata={"format": "pt"})
    weight_map = {name: file for file, members in shards.items() for name in members}
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    train_bpe_tokenizer(["a release in the format OpenBMB publishes"] * 4, 270).save(directory)


def exported_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of an exported directory (sharded or not), as stored."""
    index = directory / INDEX_FILE
    files = (
        set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    )
    tensors = {}
    for file in files:
        with safe_open(directory / file, "np") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": False, "sparse_config": SPARSE}],
    ids=["0.5B-tied-dense", "8B-untied-sparse"],
)
def test_release_imports_exports_and_reimports_exactly(tmp_path, overrides):
    config = release_config(**overrides)
    tensors = release_tensors(config)
    write_release(tmp_path / "release", config, tensors)
    first = RunCheckpoint(import_hf(tmp_path / "release", tmp_path / "wd1"))
    model = first.model_cfg
    assert (model.tie_embeddings, model.scale_emb, model.dim_model_base) == (
        "sparse_config" not in config,
        12,
        256,
    )
    assert model.rope.short_factor == tuple(FACTORS) and model.attention == (
        "infllm_v2" if overrides else "auto"
    )
    out = export(first.workdir, tmp_path / "export", "minicpm", dtype="bfloat16", max_shard_bytes=20_000)
    exported = json.loads((out / "config.json").read_text())
    kept = {key: value for key, value in config.items() if key not in METADATA}
    assert {key: exported[key] for key in kept} == kept and "model_type" not in exported
    assert exported["sparse_config"] == overrides.get("sparse_config")  # null when dense
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 4]
    written = exported_tensors(out)
    assert sorted(written) == sorted(tensors)
    for name, value in tensors.items():
        assert written[name].dtype == value.dtype and written[name].tobytes() == value.tobytes(), name
    second = RunCheckpoint(import_hf(out, tmp_path / "wd2"))
    assert second.model_cfg == model
    again, params = second.read_params(), first.read_params()
    assert all(np.array_equal(again[name], value) for name, value in params.items())


def test_a_dense_release_stays_dense_under_a_sparse_training_config(tmp_path):
    config = release_config()
    write_release(tmp_path / "release", config, release_tensors(config))
    sparse = Config().replace(model=dataclasses.replace(Config().model, attention="infllm_v2"))
    workdir = import_hf(tmp_path / "release", tmp_path / "wd", config=sparse)
    assert RunCheckpoint(workdir).model_cfg.attention == sparse.model.dense_attention


def test_a_sparse_run_exports_to_llama_only_with_allow_dense(tmp_path):
    config = release_config(sparse_config=SPARSE)
    write_release(tmp_path / "release", config, release_tensors(config))
    workdir = import_hf(tmp_path / "release", tmp_path / "wd")
    with pytest.raises(ValueError, match="llama format has no InfLLM v2 .* --allow_dense"):
        export(workdir, tmp_path / "llama", "llama")
    assert not (tmp_path / "llama").exists()
    llama = json.loads(
        (export(workdir, tmp_path / "llama", "llama", allow_dense=True) / "config.json").read_text()
    )
    assert "sparse_config" not in llama


def openbmb_attended(scores: np.ndarray, pos: int, sparse: dict) -> set[int]:
    """The blocks query `pos` attends in OpenBMB's convention (one document): its top-k counts the init blocks
    (scored +inf) but not the window's (scored -inf, attended beside the top-k by the kernel's window of
    window_size // block_size blocks ending at the query's own); future blocks are dropped."""
    own, window_blocks = pos // sparse["block_size"], sparse["window_size"] // sparse["block_size"]
    window = set(range(max(own - window_blocks + 1, 0), own + 1))
    init = set(range(min(sparse["init_blocks"], own + 1)))
    others = sorted((b for b in range(own + 1) if b not in window | init), key=lambda b: -scores[b])
    return init | window | set(others[: sparse["topk"] - sparse["init_blocks"]])


@pytest.mark.parametrize(
    "sparse",
    [SPARSE, {**SPARSE, "init_blocks": 2, "window_size": 48, "topk": 4}],
    ids=["release-like", "2-init-3-window"],
)
def test_imported_sparse_config_attends_openbmbs_blocks(sparse):
    """After the sparse_config round trip, mct's block selection (given block scores) picks OpenBMB's set."""
    fields = hf_layout.model_fields(release_config(sparse_config=sparse), "config.json", unfold_mup=False)
    settings = SparseSettings(**fields["sparse"])
    assert openbmb.sparse_to_release(settings) == sparse
    n_blocks = 16
    seq = n_blocks * sparse["block_size"]
    scores = np.random.default_rng(1).random((1, 1, seq, n_blocks), dtype=np.float32)  # [b, kv, seq, blocks]
    pos = np.arange(seq, dtype=np.int32)[None]  # [b, seq]
    picked = np.asarray(
        _top_blocks(jnp.asarray(scores), jnp.ones_like(pos), jnp.zeros_like(pos), pos, settings)
    )
    sparse_queries = 0
    for i in range(seq):
        want = openbmb_attended(scores[0, 0, i], i, sparse)
        assert set(picked[0, 0, i][picked[0, 0, i] >= 0].tolist()) == want, i
        sparse_queries += len(want) < i // sparse["block_size"] + 1
    assert sparse_queries > seq // 2  # most queries really skip blocks


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"sparse_config": {**SPARSE, "use_nope": True}}, "sparse_config.use_nope=True is not supported"),
        ({"sparse_config": {**SPARSE, "stride_blocks": 2}}, "sparse_config.stride_blocks is not supported"),
        ({"sparse_config": {**SPARSE, "topk": 0}}, "sparse_config.topk 0 must count its init_blocks 1"),
        ({"sparse_config": {**SPARSE, "window_size": 40}}, "window_size 40 must be a positive multiple"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported"),
        ({"use_sliding_window": True}, "config field 'use_sliding_window' is not supported"),
        ({"mup_denominator": 32}, "config field 'mup_denominator'=32 is not supported"),
        ({"attention_bias": True}, "config field 'attention_bias'=True is not supported"),
        ({"architectures": ["MiniCPM3ForCausalLM"]}, "model_type None is not one of"),
    ],
    ids=[
        "use-nope",
        "unknown-sparse-key",
        "topk-below-init",
        "window-not-blocks",
        "unknown-rope",
        "unknown-key",
        "mup-denominator",
        "bias",
        "other-architecture",
    ],
)
def test_fields_mct_cannot_honour_are_refused_by_name(tmp_path, overrides, error):
    write_release(tmp_path / "release", release_config(**overrides))
    path = tmp_path / "release" / "config.json"
    with pytest.raises(ValueError, match=f"{path}: .*{error}"):
        import_hf(tmp_path / "release", tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


# The published config.json fields of the two releases (hub pages of openbmb/MiniCPM4-0.5B and -8B).
PUBLISHED = {
    "minicpm4_0p5b": release_config(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=4096,
        vocab_size=73448,
        eos_token_id=[2, 73440],
        rope_scaling={
            "rope_type": "longrope",
            "long_factor": list(minicpm4_0p5b.RELEASED_LONGROPE_FACTORS),
            "short_factor": list(minicpm4_0p5b.RELEASED_LONGROPE_FACTORS),
            "original_max_position_embeddings": 32768,
        },
    ),
    "minicpm4_8b": release_config(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=2,
        intermediate_size=16384,
        vocab_size=73448,
        eos_token_id=[2, 73440],
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_scaling=None,
        sparse_config={
            "kernel_size": 32,
            "kernel_stride": 16,
            "init_blocks": 1,
            "block_size": 64,
            "window_size": 2048,
            "topk": 64,
            "use_nope": False,
            "dense_len": 8192,
        },
    ),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_release_configs_are_the_published_models(name):
    """experiments/configs/NAME.py's model is what importing the published config.json gives."""
    model = Config.from_dict(
        importlib.import_module(f"experiments.configs.{name}").get_config().to_dict()
    ).model
    fields = hf_layout.model_fields(PUBLISHED[name], "config.json", unfold_mup=False)
    assert model.rope == RopeConfig(**fields.pop("rope"))
    sparse = fields.pop("sparse", {})
    assert {key: getattr(model.sparse, key) for key in sparse} == sparse
    assert {key: getattr(model, key) for key in fields} == fields


def one_line_error(*args: str) -> str:
    """The `error: ...` line of a refused `python -m mct.X ...` (exit 2, no traceback)."""
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def test_the_commands_refuse_in_one_line_with_exit_2(tmp_path):
    write_release(tmp_path / "bad", release_config(sparse_config={**SPARSE, "use_nope": True}))
    line = one_line_error("mct.import_hf", f"--hf_dir={tmp_path / 'bad'}", f"--out={tmp_path / 'wd'}")
    assert "config.json" in line and "sparse_config.use_nope" in line
    config = release_config(sparse_config=SPARSE)
    write_release(tmp_path / "release", config, release_tensors(config))
    workdir = import_hf(tmp_path / "release", tmp_path / "wd")
    for format in ("llama", "gguf"):
        line = one_line_error(
            "mct.export", f"--workdir={workdir}", f"--format={format}", f"--out={tmp_path / 'x'}"
        )
        assert f"the {format} format has no InfLLM v2" in line and "--allow_dense" in line
