"""A stock transformers LlamaForCausalLM loads the `llama` export and computes the JAX model's logits and greedy
tokens; the exported tokenizer encodes a prompt as mct does. Skipped unless torch and transformers are installed."""

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.tokenizer import load_tokenizer
from mct.config.model import ModelConfig
from mct.export.hf_export import export
from mct.infer.decoding import generate
from mct.infer.generate import encode_prompts
from mct.model.decoder import ParamsModel
from tests.data_fixtures import make_tiny_dataset
from tests.test_export import LONGROPE, save_random_run, tiny_run_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def mct_logits(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    """The mct model's logits [batch, seq, vocab] for tokens [batch, seq], each row one document."""
    m = ParamsModel(cfg).bind(params)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    hidden = m(jnp.asarray(tokens), jnp.asarray(positions), jnp.ones(tokens.shape, jnp.int32))
    return np.asarray(jnp.einsum("bsd,dv->bsv", hidden, m.head_weight()))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=300)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": False, "n_kv_heads": 1, "rope": LONGROPE, "max_position": 64}],
    ids=["tied-mup", "untied-mqa-longrope"],
)
def test_llama_export_matches_transformers(tmp_path, dataset, overrides):
    config = tiny_run_config(tmp_path / "wd", dataset, **overrides)
    params = save_random_run(tmp_path / "wd", config)
    cfg = config.model
    hf_dir = export(tmp_path / "wd", tmp_path / "hf", "llama")
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    # Logits on random sequences; 24 tokens pass LongRoPE's original 16 positions, so its long factors apply.
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 24))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = mct_logits(cfg, params, tokens)
    max_abs = np.abs(got - want).max()
    assert max_abs < 1e-4 * np.abs(want).max(), f"max abs difference {max_abs}"

    # The exported tokenizer encodes a prompt as mct does, BOS first.
    text = "the river runs to the sea"
    prompt = encode_prompts(load_tokenizer(dataset), [text])[0]
    hf_prompt = transformers.AutoTokenizer.from_pretrained(hf_dir)(text, return_tensors="pt").input_ids
    assert hf_prompt[0].tolist() == prompt

    # Greedy generation: transformers' tokens up to its first EOS are mct.generate's (which drops the EOS).
    # The prompt alone (19 tokens) passes LongRoPE's original context, so both pick the long factors for every
    # step (transformers switches lists by the current length, mct once per generation by prompt + new tokens).
    eos = 2
    with torch.no_grad():
        hf_out = hf.generate(hf_prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)[
            0, len(prompt) :
        ].tolist()
    if eos in hf_out:
        hf_out = hf_out[: hf_out.index(eos)]
    assert generate(cfg, params, [prompt], max_new_tokens=12, eos_id=eos)[0] == hf_out
