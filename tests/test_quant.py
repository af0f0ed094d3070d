"""BitCPM ternary quantiser (mct/model/quant.py) against a NumPy loop; the STE; packing; the config checks; QAT."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mct.config.model import ModelConfig, QuantConfig
from mct.config.run import Config
from mct.errors import ConfigError
from mct.model import quant
from mct.model.decoder import ParamsModel
from mct.run.training_run import train
from tests.data_fixtures import make_tiny_dataset
from tests.test_export import random_params
from tests.tiny_runs import first_metrics, losses, make_config


def numpy_ternary(matrix: np.ndarray, group_size: int, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """codes, scales of an [in, out] matrix, one group (column j, rows g*G .. g*G+G-1) at a time."""
    n_in, n_out = matrix.shape
    codes = np.zeros(matrix.shape, np.int8)
    scales = np.zeros((n_in // group_size, n_out), np.float32)
    for j in range(n_out):
        for g in range(n_in // group_size):
            rows = slice(g * group_size, (g + 1) * group_size)
            s = max(np.float32(np.mean(np.abs(matrix[rows, j]), dtype=np.float32)), np.float32(eps))
            scales[g, j] = s
            codes[rows, j] = np.clip(np.round(matrix[rows, j] / np.float32(s)), -1, 1)  # half to even
    return codes, scales


def test_codes_and_scales_match_numpy_per_group():
    w = np.random.default_rng(0).standard_normal((64, 6)).astype(np.float32) * 0.02
    w[:32, 0] = 0.0  # an all-zero group: scale eps, codes 0
    codes, scales = quant.ternary_codes(w, 32)
    want_codes, want_scales = numpy_ternary(w, 32)
    np.testing.assert_array_equal(np.asarray(codes), want_codes)
    np.testing.assert_allclose(np.asarray(scales), want_scales, rtol=1e-6)
    assert np.asarray(scales)[0, 0] == np.float32(quant.EPS) and codes.dtype == jnp.int8
    dequant = np.asarray(quant.ternary(w, 32))
    np.testing.assert_allclose(dequant, want_codes * np.repeat(want_scales, 32, axis=0), rtol=1e-6)
    # HF orientation [out, in]: the same groups along the last axis
    hf_codes, hf_scales = quant.ternary_codes(w.T, 32, axis=-1)
    np.testing.assert_array_equal(np.asarray(hf_codes), want_codes.T)
    np.testing.assert_allclose(np.asarray(hf_scales), want_scales.T, rtol=1e-6)


def test_rounding_at_exactly_half_a_scale_is_half_to_even():
    # one group of 4 with mean |w| = 1 exactly: w / s is exact, ties at +-0.5 go to 0, +-1.5 clamp to +-1
    w = np.array([[0.5], [-0.5], [1.5], [-1.5]], np.float32)
    codes, scales = quant.ternary_codes(w, 4)
    assert float(scales[0, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(codes)[:, 0], [0, 0, 1, -1])
    codes, _ = quant.ternary_codes(np.array([[0.6], [-0.4], [1.5], [-1.5]], np.float32), 4)  # off the tie
    np.testing.assert_array_equal(np.asarray(codes)[:, 0], [1, 0, 1, -1])


def test_parameter_views_group_along_the_contraction_dims():
    rng = np.random.default_rng(1)
    wo = rng.standard_normal((2, 4, 16, 32)).astype(
        np.float32
    )  # [L, heads, head_dim, d]: in = heads*head_dim
    codes, scales = quant.param_codes("wo", wo, 32)
    assert codes.shape == (2, 64, 32) and scales.shape == (2, 2, 32)
    np.testing.assert_array_equal(np.asarray(codes)[1], numpy_ternary(wo[1].reshape(64, 32), 32)[0])
    wq = rng.standard_normal((2, 64, 4, 16)).astype(np.float32)  # [L, d, heads, head_dim]: in = d
    codes, _ = quant.param_codes("wq", wq, 32)
    np.testing.assert_array_equal(np.asarray(codes)[0], numpy_ternary(wq[0].reshape(64, 64), 32)[0])


def test_ste_value_is_exact_and_gradient_is_the_identity():
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 8)) * 0.05
    np.testing.assert_array_equal(np.asarray(quant.ste(w, 32)), np.asarray(quant.ternary(w, 32)))
    probe = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
    grad_ste = jax.grad(lambda x: jnp.sum(jnp.sin(quant.ste(x, 32)) * probe))(w)
    # the identity's gradient of the same loss, evaluated at the quantised point
    grad_id = jax.grad(lambda x: jnp.sum(jnp.sin(x) * probe))(quant.ternary(w, 32))
    np.testing.assert_allclose(np.asarray(grad_ste), np.asarray(grad_id), rtol=1e-6)


def test_model_forward_and_decoding_use_the_quantised_weights():
    cfg = ModelConfig(vocab_size=64, quant=QuantConfig("ternary", 32))
    params = random_params(cfg)
    quantised = {
        k: (quant.ternary(quant.as_matrix(k, v), 32).reshape(v.shape) if k in quant.QUANTISED else v)
        for k, v in params.items()
    }
    plain = ParamsModel(dataclasses.replace(cfg, quant=QuantConfig()))
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 64
    positions, segments = jnp.tile(jnp.arange(8), (2, 1)), jnp.ones((2, 8), jnp.int32)
    forward = lambda model: jax.jit(lambda p: model.bind(p)(tokens, positions, segments))
    got, want = forward(ParamsModel(cfg))(params), forward(plain)(quantised)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    once_cfg, once = quant.quantised_once(cfg, params)  # what decoding runs: quantised once, then plain
    assert once_cfg.quant.weights == "none"
    np.testing.assert_array_equal(np.asarray(forward(ParamsModel(once_cfg))(once)), np.asarray(want))


def test_stats_count_zeros_and_scales_per_layer():
    cfg = ModelConfig(vocab_size=64, quant=QuantConfig("ternary", 32))
    params = random_params(cfg)
    stats = quant.ternary_stats(cfg.quant, params)
    zeros = total = 0
    scales = []
    for name in quant.QUANTISED:
        c, s = numpy_ternary(np.asarray(quant.as_matrix(name, params[name][1])), 32)
        zeros, total = zeros + (c == 0).sum(), total + c.size
        scales.append(s.ravel())
    assert float(stats["quant/zero_frac/layer_1"]) == pytest.approx(zeros / total, rel=1e-6)
    assert float(stats["quant/scale/layer_1"]) == pytest.approx(np.concatenate(scales).mean(), rel=1e-5)
    assert sorted(stats) == sorted(f"quant/{k}/layer_{i}" for k in ("zero_frac", "scale") for i in (0, 1))


@pytest.mark.parametrize("n", [1, 4, 7, 32])
def test_packing_round_trip(n):
    codes = np.random.default_rng(n).integers(-1, 2, size=(3, n)).astype(np.int8)
    packed = quant.pack_ternary(codes)
    assert packed.dtype == np.uint8 and packed.shape == (3, -(-n // 4))
    np.testing.assert_array_equal(quant.unpack_ternary(packed, n), codes)
    # the documented bit layout: element 4i + j in bits 2j..2j+1 of byte i, code + 1
    if n == 4:
        row = codes[0].astype(int) + 1
        assert packed[0, 0] == row[0] | row[1] << 2 | row[2] << 4 | row[3] << 6


def test_packing_refuses_bad_input():
    with pytest.raises(ValueError, match="must be in"):
        quant.pack_ternary(np.array([2, 0, 0, 0], np.int8))
    with pytest.raises(ValueError, match="invalid 2-bit value"):
        quant.unpack_ternary(np.array([0xFF], np.uint8), 4)
    with pytest.raises(ValueError, match="do not hold"):
        quant.unpack_ternary(np.array([0x55, 0x55], np.uint8), 4)
    with pytest.raises(ValueError, match="does not divide"):
        quant.ternary_codes(np.ones((48, 2), np.float32), 32)


def test_config_checks_name_the_key():
    def validate(**quant_fields):
        model = dataclasses.replace(ModelConfig(), quant=QuantConfig(**quant_fields))
        Config(model=model).resolve().validate(8)

    validate(weights="ternary", group_size=32)
    with pytest.raises(ConfigError, match=r"model\.quant\.group_size=48 does not divide .*d_model=64"):
        validate(weights="ternary", group_size=48)
    with pytest.raises(ConfigError, match=r"model\.quant\.weights='int4' is not one of"):
        validate(weights="int4")
    validate(weights="none", group_size=48)  # unused when off
    with pytest.raises(ConfigError, match=r"unknown config key model\.quant\.group"):
        Config.from_dict({"model": {"quant": {"group": 8}}})


def test_stage2_qat_from_a_checkpoint_lowers_the_loss_and_reports_the_stats(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "data", vocab_size=300)
    one = jax.devices()[:1]
    train(make_config(tmp_path / "fp32", dataset), devices=one)
    qat = {
        "train.steps": 12,
        "model.quant.weights": "ternary",
        "init_from": str(tmp_path / "fp32"),
        "optimizer.lr": 0.005,
    }
    train(make_config(tmp_path / "qat", dataset, **qat), devices=one)
    source, curve = losses(tmp_path / "fp32"), losses(tmp_path / "qat")
    assert curve[1] < source[1] - 0.3  # starts from the trained params, not from an init
    assert np.mean([curve[s] for s in (11, 12)]) < curve[1] - 0.05  # QAT lowers the quantised model's loss
    lines = [json.loads(line) for line in (tmp_path / "qat" / "metrics.jsonl").read_text().splitlines()]
    by_step = {m["step"]: m for m in lines if "lr" in m}
    assert by_step[1]["lr"] < by_step[3]["lr"] == pytest.approx(0.005)  # re-warmed, fresh optimizer
    assert 0.05 < by_step[1]["quant/zero_frac/layer_0"] < 0.9 and by_step[1]["quant/scale/layer_1"] > 0
    assert "quant/zero_frac/layer_0" not in first_metrics(tmp_path / "fp32")  # off: no extra metrics
