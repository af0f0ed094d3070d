"""MiniCPM forward pass against the NumPy oracle; packing; loss chunking; parameter counts."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.config.model import REMAT_NAMES, model_from_dict
from mct.model.attention import pin_attention
from mct.model.decoder import ParamsModel, count_params
from mct.model.loss import loss_sums, token_losses
from tests import reference_model


def tiny_model_cfg(**overrides):
    shape = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=96, vocab_size=97)
    return model_from_dict({**shape, "attention": "naive", **overrides})


def perturbed_params(model: ParamsModel, seed: int = 0) -> dict:
    """Random params with non-trivial norms so that every weight matters."""
    params = model.init(seed)
    rng = np.random.default_rng(seed)
    for name in ("attn_norm", "mlp_norm", "final_norm"):
        params[name] = params[name] + 0.3 * rng.standard_normal(params[name].shape).astype(np.float32)
    return params


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False, "n_kv_heads": 1},
        {"parametrization": "sp", "n_kv_heads": 4, "scan_layers": False},
        # LongRoPE: the sequence (24) exceeds the original context (16), so the long factors apply.
        {
            "rope": {
                "type": "longrope",
                "original_max_position": 16,
                "theta": 10000.0,
                "short_factor": tuple(1.0 + 0.1 * i for i in range(8)),
                "long_factor": tuple(1.0 + 0.5 * i for i in range(8)),
            },
            "max_position": 64,
        },
    ],
    ids=["mup-gqa2", "untied-mqa", "sp-mha-unrolled", "longrope"],
)
def test_forward_matches_numpy(overrides):
    cfg = tiny_model_cfg(**overrides)
    model = ParamsModel(cfg)
    params = perturbed_params(model)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (2, 24)).astype(np.int32)
    segments = np.array([[1] * 10 + [2] * 14, [1] * 24], np.int32)
    positions = np.array([list(range(10)) + list(range(14)), list(range(24))], np.int32)
    m = model.bind(params)
    got = np.asarray(jnp.einsum("bsd,dv->bsv", m(tokens, positions, segments), m.head_weight()))
    for b in range(2):
        want = reference_model.logits(params, cfg, tokens[b], positions[b], segments[b])
        np.testing.assert_allclose(got[b], want, rtol=2e-4, atol=2e-4)


def _batch(tokens, segments, positions):
    return {
        "tokens": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(positions),
        "loss_mask": jnp.ones(segments.shape, jnp.float32),
    }


@pytest.mark.parametrize("attention", ["naive", "blockwise"])
def test_packed_documents_match_separate_runs(attention):
    cfg = tiny_model_cfg(attention=attention, attention_block=8)
    model = ParamsModel(cfg)
    m = model.bind(model.init(0))
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(0, cfg.vocab_size, 13), rng.integers(0, cfg.vocab_size, 19)
    # Packed: inputs doc[:-1], targets doc[1:] per document, one segment id each.
    packed_in = np.concatenate([doc_a[:-1], doc_b[:-1]])
    packed_tg = np.concatenate([doc_a[1:], doc_b[1:]])
    seg = np.array([[1] * 12 + [2] * 18])
    pos = np.array([list(range(12)) + list(range(18))])
    packed = {
        "tokens": jnp.asarray(packed_in[None]),
        "targets": jnp.asarray(packed_tg[None]),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(pos),
        "loss_mask": jnp.ones((1, 30)),
    }
    got = np.asarray(token_losses(m, packed))[0]
    alone = [
        np.asarray(
            token_losses(m, _batch(d[None], np.ones((1, len(d) - 1), np.int32), np.arange(len(d) - 1)[None]))
        )[0]
        for d in (doc_a, doc_b)
    ]
    np.testing.assert_allclose(got, np.concatenate(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_chunk, unroll", [(0, False), (8, False), (8, True)])
def test_fused_loss_and_gradients_match_plain_autodiff(loss_chunk, unroll):
    """The custom-VJP loss (chunked or not, its chunk loop unrolled or not) against jax.grad of a plain
    log-softmax loss over full logits."""
    cfg = tiny_model_cfg(tie_embeddings=False, loss_chunk=loss_chunk, unroll_loops=unroll)
    model = ParamsModel(cfg)
    params = perturbed_params(model)
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab_size, (2, 33))
    batch = _batch(tokens, np.ones((2, 32), np.int32), np.tile(np.arange(32), (2, 1)))
    batch["loss_mask"] = jnp.asarray(rng.random((2, 32)) < 0.7, jnp.float32)  # some tokens not counted

    def plain(p):
        m = model.bind(p)
        h = m(batch["tokens"], batch["positions"], batch["segment_ids"])
        logp = jax.nn.log_softmax(h @ m.head_weight(), axis=-1)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"])

    fused = lambda p: loss_sums(model.bind(p), batch)[0]
    np.testing.assert_allclose(fused(params), plain(params), rtol=1e-6)
    np.testing.assert_allclose(
        jnp.sum(token_losses(model.bind(params), batch) * batch["loss_mask"]), plain(params), rtol=1e-6
    )
    g_plain, g_fused = jax.grad(plain)(params), jax.grad(lambda p: 3.0 * fused(p))(params)
    for name in g_plain:  # fp32 sums in another order: compare relative to the gradient's scale
        scale = float(jnp.max(jnp.abs(g_plain[name])))
        np.testing.assert_allclose(
            g_fused[name], 3.0 * g_plain[name], rtol=1e-4, atol=1e-5 * scale, err_msg=name
        )


# The released checkpoints' tensor sizes: 0.5B = 73448 x 1024 (tied) + 24 x 14,944,256 + 1024; 8B = 2 x 73448 x
# 4096 (untied) + 32 x 236,986,368 + 4096 (a layer: q, o d x d; k, v d x 2 x head_dim; 3 MLP matrices; 2 norms).
@pytest.mark.parametrize("name, expected", [("minicpm4_0p5b", 433_873_920), ("minicpm4_8b", 8_185_253_888)])
def test_release_param_counts(name, expected):
    cfg = importlib.import_module(f"experiments.configs.{name}").get_config().model
    assert count_params(cfg) == expected


def _remat_loss_and_grads(remat: str):
    cfg = pin_attention(tiny_model_cfg(remat=remat, scan_layers=False), "cpu")  # unrolled: every layer shows
    model = ParamsModel(cfg)
    params = perturbed_params(model)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 17))
    batch = _batch(tokens, np.ones((2, 16), np.int32), np.tile(np.arange(16), (2, 1)))
    loss = lambda p: loss_sums(model.bind(p), batch)[0]
    return loss, params


@pytest.mark.parametrize("remat", [r for r in REMAT_NAMES if r != "none"])
def test_every_remat_policy_gives_the_same_gradients(remat):
    loss, params = _remat_loss_and_grads("none")
    want = jax.jit(jax.grad(loss))(params)
    loss, _ = _remat_loss_and_grads(remat)
    got = jax.jit(jax.grad(loss))(params)
    for name in want:  # recomputation may fuse in another order: compare relative to the gradient's scale
        scale = float(jnp.max(jnp.abs(want[name])))
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * scale, err_msg=name)


def test_named_remat_policies_save_what_they_name(capsys):
    def saved(remat: str) -> str:
        loss, params = _remat_loss_and_grads(remat)
        jax.ad_checkpoint.print_saved_residuals(loss, params)
        return capsys.readouterr().out

    named = lambda remat: {line.split("'")[1] for line in saved(remat).splitlines() if " named '" in line}
    # a layer's output residual is the next layer's input: saved by every policy
    assert named("save_qkv_proj") == {"qkv_proj", "residual"}
    assert named("save_attn_out") == {"qkv_proj", "attn_out", "residual"}
    assert named("save_dot_except_mlp") == {"qkv_proj", "attn_out", "out_proj", "residual"}
    assert named("full") == {"residual"}
