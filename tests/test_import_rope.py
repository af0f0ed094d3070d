"""Stock transformers Llama checkpoints import with transformers' own rotary embedding, for every RoPE type mct
computes and in both config.json layouts (transformers 5's `rope_parameters`, the older `rope_theta` +
`rope_scaling`); export writes RoPE settings that read back the same; other RoPE types are refused. Skipped
unless torch and transformers are installed."""

import dataclasses
import json
import re

import numpy as np
import pytest

from mct.config.model import ModelConfig, RopeConfig
from mct.export.hf_export import hf_layout
from mct.export.hf_import import import_hf
from mct.model.rope import rope_tables
from mct.run.reader import RunCheckpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

from tests.test_export_transformers import mct_logits  # noqa: E402

SEQ = 24  # past the longrope settings' original context of 16, so their long factors apply
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    # wavelengths 6.3, 20, 63, 200, ...: one kept, two blended, the rest divided by the factor
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 16,
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [1.0 + 0.5 * i for i in range(8)],
    },
    # correction band of dimensions 1..4 at theta 10000: some kept, some blended, some divided
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}
# LongRoPE's cos/sin magnitude three ways: from the lengths (above), from `factor`, or given; YaRN's settings.
MORE_ROPES = {
    "longrope-factor": {**ROPES["longrope"], "factor": 4.0},
    "longrope-attention": {**ROPES["longrope"], "attention_factor": 1.3},
    "yarn-betas-untruncated": {**ROPES["yarn"], "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "yarn-mscale": {**ROPES["yarn"], "mscale": 0.8, "mscale_all_dim": 0.5},
    "yarn-attention": {**ROPES["yarn"], "attention_factor": 1.2},
    "yarn-no-factor": {**ROPES["yarn"], "factor": None},  # the length ratio 256 / 64
}


def llama_config(rope_parameters: dict, **overrides) -> "transformers.LlamaConfig":
    """A tiny Llama; initializer_range 0.2 keeps attention far from uniform, so RoPE shows in the logits."""
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        initializer_range=0.2,
    )
    return transformers.LlamaConfig(
        **shape, rope_parameters=json.loads(json.dumps(rope_parameters)), **overrides
    )


def imported_rope(hf: dict) -> RopeConfig:
    return RopeConfig(**hf_layout.model_fields(hf, "config.json", unfold_mup=False)["rope"])


def assert_transformers_tables(config: "transformers.LlamaConfig", rope: RopeConfig, seq_len: int) -> None:
    """rope_tables(rope) gives the inverse frequencies and cos/sin magnitude transformers uses at seq_len."""
    rotary = LlamaRotaryEmbedding(config)
    rotary(torch.zeros(1), torch.arange(seq_len)[None])  # LongRoPE picks its factor list by the length
    inv_freq, mscale = rope_tables(rope, config.head_dim, seq_len, config.max_position_embeddings)
    np.testing.assert_allclose(np.asarray(inv_freq), rotary.inv_freq.numpy(), rtol=1e-6)
    assert mscale == pytest.approx(rotary.attention_scaling, rel=1e-7)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_imported_llama_computes_transformers_logits(tmp_path, rope, tie):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(llama_config(ROPES[rope], tie_word_embeddings=tie)).eval()
    hf.save_pretrained(tmp_path / "hf")
    run = RunCheckpoint(import_hf(tmp_path / "hf", tmp_path / "wd"))
    assert (run.model_cfg.rope.type, run.model_cfg.tie_embeddings) == (rope, tie)
    tokens = np.random.default_rng(0).integers(0, 128, (2, SEQ))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = mct_logits(run.model_cfg, run.read_params(), tokens)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seq_len", [8, SEQ])
@pytest.mark.parametrize("rope", list(ROPES) + list(MORE_ROPES))
def test_rope_tables_are_transformers(rope, seq_len):
    config = llama_config({**ROPES, **MORE_ROPES}[rope])
    assert_transformers_tables(config, imported_rope(config.to_dict()), seq_len)


def test_top_level_original_context_wins_as_in_transformers():
    """Phi-3's layout: original_max_position_embeddings next to the settings overrides theirs."""
    config = llama_config(
        {**ROPES["longrope"], "original_max_position_embeddings": 64}, original_max_position_embeddings=16
    )
    rope = imported_rope(config.to_dict())
    assert rope.original_max_position == 16
    assert_transformers_tables(config, rope, SEQ)


@pytest.mark.parametrize("rope", list(ROPES))
def test_old_config_layout_reads_the_same(rope):
    """transformers 4's config.json: rope_theta at the top level, the rest in rope_scaling under "type"."""
    new = llama_config(ROPES[rope]).to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    settings = {k: v for k, v in new["rope_parameters"].items() if k not in ("rope_type", "rope_theta")}
    old["rope_theta"] = new["rope_parameters"]["rope_theta"]
    old["rope_scaling"] = {"type": rope, **settings} if rope != "default" else None
    assert imported_rope(old) == imported_rope(new)


@pytest.mark.parametrize(
    "rope",
    [
        RopeConfig(theta=500000.0),
        RopeConfig(type="linear", factor=4.0),
        RopeConfig(
            type="llama3", factor=8.0, original_max_position=64, low_freq_factor=2.0, high_freq_factor=8.0
        ),
        RopeConfig(
            type="longrope",
            original_max_position=16,
            short_factor=(1.5,) * 8,
            long_factor=(3.0,) * 8,
            attention_factor=1.3,
        ),
        RopeConfig(
            type="yarn", factor=8.0, original_max_position=64, beta_fast=16.0, beta_slow=2.0, truncate=False
        ),
    ],
    ids=lambda rope: rope.type,
)
def test_exported_rope_reads_back_in_mct_and_transformers(rope):
    cfg = dataclasses.replace(ModelConfig(), max_position=256, rope=rope)
    hf = hf_layout.hf_config(cfg, "llama", {}, "float32")
    assert imported_rope(hf) == rope
    assert_transformers_tables(transformers.LlamaConfig.from_dict(hf), rope, SEQ)


@pytest.mark.parametrize(
    "where, settings, error",
    [
        ("rope_parameters", {"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
        ("rope_scaling", {"type": "su", "factor": 4.0}, "rope_scaling rope_type 'su' is not supported"),
        (
            "rope_parameters",
            {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
            "rope_parameters.partial_rotary_factor is not supported with rope_type 'linear'",
        ),
        (
            "rope_scaling",
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
            "lacks the field rope_scaling.'high_freq_factor'",
        ),
    ],
    ids=["dynamic", "old-layout-su", "partial-rotary", "llama3-incomplete"],
)
def test_unsupported_rope_is_refused(tmp_path, where, settings, error):
    hf = llama_config({"rope_type": "default", "rope_theta": 10000.0}).to_dict()
    hf[where] = settings
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / 'hf' / 'config.json'}: ") + ".*" + re.escape(error)
    ):
        import_hf(tmp_path / "hf", tmp_path / "wd")
    assert not (tmp_path / "wd").exists()
