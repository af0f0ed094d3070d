"""Mixture of experts (mct/model/moe.py) and sparse upcycling (mct/run/upcycle.py) against NumPy and the dense model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.config.model import MoEConfig, model_from_dict
from mct.config.run import Config
from mct.model.decoder import ParamsModel
from mct.model.moe import moe_forward
from mct.model.objectives import pretraining_objective
from mct.run.reader import RunCheckpoint
from mct.run.upcycle import upcycle, upcycle_params
from mct.train.trainer import build
from tests import reference_model
from tests.data_fixtures import make_tiny_dataset
from tests.test_export import save_random_run, tiny_run_config

SHAPE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=96, vocab_size=97)


def moe_cfg(**moe):
    return model_from_dict({**SHAPE, "attention": "naive", "moe": {"num_experts": 4, "top_k": 2, **moe}})


def random_experts(rng, d=64, f=96, experts=4, router_std=1.0) -> dict:
    return {
        "w_gate": 0.2 * rng.standard_normal((experts, d, f)),
        "w_up": 0.2 * rng.standard_normal((experts, d, f)),
        "w_down": 0.2 * rng.standard_normal((experts, f, d)),
        "router": router_std * rng.standard_normal((d, experts)),
    }


def logits_of(cfg, params, tokens, positions, segments):
    m = ParamsModel(cfg).bind(params)
    return np.asarray(jnp.einsum("bsd,dv->bsv", m(tokens, positions, segments), m.head_weight()))


def test_router_top2_combine_and_aux_losses_match_numpy():
    rng = np.random.default_rng(0)
    w = random_experts(rng)
    x = rng.standard_normal((2, 12, 64))
    cfg = moe_cfg()
    as32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
    out, stats = moe_forward(cfg, jnp.asarray(x, jnp.float32), as32(w), dropless=True)
    want, want_stats = reference_model.moe(x.reshape(24, 64), w, top_k=2)
    np.testing.assert_allclose(np.asarray(out).reshape(24, 64), want, rtol=2e-4, atol=2e-5)
    for key in ("aux_loss", "z_loss"):
        np.testing.assert_allclose(float(stats[key]), want_stats[key], rtol=1e-5)
    # an expert capacity nothing reaches computes the same as dropless
    roomy = moe_forward(moe_cfg(capacity_factor=2.0), jnp.asarray(x, jnp.float32), as32(w), dropless=False)
    np.testing.assert_allclose(np.asarray(roomy[0]), np.asarray(out), rtol=1e-5, atol=1e-6)
    assert float(roomy[1]["dropped"]) == 0


def test_moe_model_forward_matches_numpy():
    cfg = moe_cfg()
    params = ParamsModel(cfg).init(0)
    rng = np.random.default_rng(1)
    params = {**params, "router": rng.standard_normal(params["router"].shape).astype(np.float32)}
    params["w_up"] = params["w_up"] + 0.05 * rng.standard_normal(params["w_up"].shape).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, (1, 20)).astype(np.int32)
    segments = np.array([[1] * 8 + [2] * 12], np.int32)
    positions = np.array([list(range(8)) + list(range(12))], np.int32)
    got = logits_of(cfg, params, tokens, positions, segments)[0]
    want = reference_model.logits(params, cfg, tokens[0], positions[0], segments[0])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_training_loss_adds_every_layers_router_losses_as_numpy_computes_them():
    """L = CE + w_aux * mean over layers of the load-balancing loss + w_z * mean of the z-loss, each layer's
    from its own router inputs (NumPy: tests/reference_model.py, float64)."""
    cfg = moe_cfg(aux_loss_weight=0.5, z_loss_weight=0.05)  # large weights: the router terms move L visibly
    rng = np.random.default_rng(2)
    params = ParamsModel(cfg).init(0)
    params["router"] = rng.standard_normal(params["router"].shape).astype(np.float32)
    tokens = rng.integers(0, cfg.vocab_size, (1, 21)).astype(np.int32)
    positions, segments = np.arange(20, dtype=np.int32)[None], np.ones((1, 20), np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions}
    batch |= {"segment_ids": segments, "loss_mask": np.ones((1, 20), np.float32)}
    total, count, extras = pretraining_objective(ParamsModel(cfg).bind(params), batch)
    layer_stats = []
    reference_model.residual(params, cfg, tokens[0, :-1], positions[0], segments[0], layer_stats)
    logits = reference_model.logits(params, cfg, tokens[0, :-1], positions[0], segments[0])
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = np.mean(logz - logits[np.arange(20), tokens[0, 1:]])
    aux, z = (np.mean([s[key] for s in layer_stats]) for key in ("aux_loss", "z_loss"))
    assert len(layer_stats) == cfg.n_layers
    # float32 vs float64, measured relative errors: aux 4e-9, z 3e-7, L 5e-8 (z = 95 and aux = 1.2 make up
    # 5.3 of L = 14.1); 1e-5 is 30x the largest
    np.testing.assert_allclose(float(extras["moe_aux_loss"] / count), aux, rtol=1e-5)
    np.testing.assert_allclose(float(extras["moe_z_loss"] / count), z, rtol=1e-5)
    np.testing.assert_allclose(float(total / count), ce + 0.5 * aux + 0.05 * z, rtol=1e-5)


def test_dropped_count_is_exact_on_a_hand_made_routing():
    """6 tokens, 3 experts, top-2, capacity ceil(1.0 * 6 * 2 / 3) = 4: expert 0 is every token's first or
    second choice (6 assignments), so the second choices of the last two tokens (4, 5) are dropped."""
    routing = [(0, 1), (0, 2), (0, 1), (0, 2), (1, 0), (2, 0)]
    router = np.zeros((8, 3))
    for t, (first, second) in enumerate(routing):
        router[t, first], router[t, second] = 3.0, 2.0  # token t is the unit vector e_t
    rng = np.random.default_rng(2)
    w = {**random_experts(rng, d=8, f=16, experts=3), "router": router}
    x = np.eye(8)[:6].reshape(1, 6, 8)
    cfg = model_from_dict(
        {**SHAPE, "d_model": 8, "moe": {"num_experts": 3, "top_k": 2, "capacity_factor": 1.0}}
    )
    as32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
    out, stats = moe_forward(cfg, jnp.asarray(x, jnp.float32), as32(w), dropless=False)
    assert float(stats["dropped"]) == 2
    p_first = np.exp(3.0) / (np.exp(3.0) + np.exp(2.0))  # renormalised top-2 weight of the first choice
    swiglu = lambda v, e: reference_model.swiglu(v, w["w_gate"][e], w["w_up"][e], w["w_down"][e])
    for t, (first, second) in enumerate(routing):
        want = p_first * swiglu(x[0, t], first) + (0.0 if t >= 4 else (1 - p_first) * swiglu(x[0, t], second))
        np.testing.assert_allclose(np.asarray(out[0, t]), want, rtol=1e-5, atol=1e-6)


def test_upcycled_model_equals_the_dense_model_at_init():
    dense_cfg = model_from_dict({**SHAPE, "attention": "naive"})
    dense = ParamsModel(dense_cfg).init(3)
    rng = np.random.default_rng(3)
    dense["mlp_norm"] = dense["mlp_norm"] + 0.3 * rng.standard_normal(dense["mlp_norm"].shape).astype(
        np.float32
    )
    tokens = rng.integers(0, 97, (2, 16)).astype(np.int32)
    positions, segments = np.tile(np.arange(16), (2, 1)), np.ones((2, 16), np.int32)
    want = logits_of(dense_cfg, dense, tokens, positions, segments)
    for moe in ({}, {"num_experts": 8, "router_init_std": 0.0, "capacity_factor": 4.0}):  # 0: uniform router
        cfg = moe_cfg(**moe)
        got = logits_of(cfg, upcycle_params(dense, cfg, seed=0), tokens, positions, segments)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _step_metrics(devices, mesh: dict) -> dict:
    cfg = Config.from_dict(
        {
            "model": {
                **SHAPE,
                "d_model": 32,
                "head_dim": 8,
                "d_mlp": 48,
                "moe": {"num_experts": 4, "capacity_factor": 1.25},
            },
            "data": {"seq_len": 16},
            "train": {"batch_size": 8, "steps": 2},
            "mesh": mesh,
        }
    )
    setup = build(cfg, devices)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, (8, 17))
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((8, 16), np.int32),
        "positions": np.tile(np.arange(16), (8, 1)),
        "loss_mask": np.ones((8, 16), np.float32),
    }
    batch = jax.device_put(
        jax.tree.map(lambda a: jnp.asarray(a, a.dtype if a.dtype != np.int64 else jnp.int32), batch),
        setup.batch_sharding,
    )
    spec = setup.state_shardings["params"]["w_gate"].spec
    with jax.set_mesh(setup.mesh):
        state, m1 = setup.step_fn(setup.init_state(0), batch, jnp.int32(0))
        _, m2 = setup.step_fn(state, batch, jnp.int32(1))
    return {"spec": spec, **{f"{k}_{i}": float(v) for i, m in enumerate((m1, m2)) for k, v in m.items()}}


def test_one_device_and_eight_with_an_expert_axis_give_the_same_losses():
    one = _step_metrics(jax.devices()[:1], {"data": 1})
    eight = _step_metrics(jax.devices()[:8], {"data": 2, "expert": 4})
    assert eight["spec"][1] == "expert"  # w_gate [layers, experts, d_model, d_mlp]: experts split 4 ways
    assert one["moe_dropped_0"] > 0  # the capacity binds, so dropping is part of what must agree
    for key in ("loss_0", "loss_1", "moe_aux_loss_0", "moe_dropped_0", "grad_norm_0"):
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-5, err_msg=key)


def test_upcycle_cli_writes_a_resumable_moe_workdir(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "data", vocab_size=300)
    config = tiny_run_config(tmp_path / "dense", dataset)
    dense = save_random_run(tmp_path / "dense", config)
    moe_config = config.replace(model=dataclasses.replace(config.model, moe=MoEConfig(num_experts=4)))
    out = upcycle(str(tmp_path / "dense"), 7, str(tmp_path / "moe"), moe_config)
    run = RunCheckpoint(out)
    assert run.step == 0 and run.model_cfg.moe.num_experts == 4
    got = run.read_params()
    np.testing.assert_array_equal(got["w_down"][:, 2], np.asarray(dense["w_down"]))
    np.testing.assert_array_equal(got["wq"], np.asarray(dense["wq"]))
    assert got["router"].shape == (config.model.n_layers, config.model.d_model, 4)
    with pytest.raises(Exception, match="already an MoE model"):
        upcycle(str(out), 0, str(tmp_path / "again"), moe_config)


def test_moe_export_is_a_mixtral_that_transformers_runs(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mct.export.hf_export import export
    from mct.run.checkpoint import Checkpointer, model_signature
    from tests.test_export import random_params
    from tests.test_export_transformers import mct_logits

    dataset = make_tiny_dataset(tmp_path / "data", vocab_size=300)
    config = tiny_run_config(tmp_path / "wd", dataset, moe={"num_experts": 4, "top_k": 2})
    params = random_params(config.model, 0)
    params["router"] = params["router"] * 5  # decisive top-2 choices: no near-tie that rounding could flip
    ckpt = Checkpointer(config.workdir, async_save=False)
    meta = {"config": config.to_dict(), "model_signature": model_signature(config.model), "step": 1}
    ckpt.save(1, {"params": params, "opt_state": {}}, None, meta)
    ckpt.wait()
    ckpt.close()
    with pytest.raises(ValueError, match="MoE model"):
        export(config.workdir, tmp_path / "llama", "llama")
    hf_dir = export(config.workdir, tmp_path / "hf", "minicpm")
    hf = transformers.MixtralForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = mct_logits(config.model, params, tokens)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
