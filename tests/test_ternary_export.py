"""Ternary export of a BitCPM QAT run: packed codes + scales read back (by NumPy and by import_hf) to exactly the
weights the QAT forward uses; the minicpm/llama exports write those dequantised weights; bad input fails."""

import json
import math
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from mct.export.hf_export import export, hf_layout
from mct.export.hf_import import import_hf
from mct.model.decoder import ParamsModel
from mct.run.reader import RunCheckpoint
from tests.data_fixtures import make_tiny_dataset
from tests.test_export import save_random_run, tiny_run_config
from tests.test_quant import numpy_ternary

GROUP = 32
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def numpy_unpack(packed: np.ndarray) -> np.ndarray:
    """uint8 [out, in/4] -> codes [out, in]: 2-bit fields code + 1, the first element in the low bits."""
    fields = [(packed.astype(np.int16) >> shift) & 3 for shift in (0, 2, 4, 6)]
    return (np.stack(fields, axis=-1).reshape(packed.shape[0], -1) - 1).astype(np.int8)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    """A saved QAT run (random latent weights, untied head) and the weights its jitted forward uses."""
    root = tmp_path_factory.mktemp("qat")
    dataset = make_tiny_dataset(root / "data", vocab_size=300)
    config = tiny_run_config(
        root / "wd", dataset, tie_embeddings=False, quant={"weights": "ternary", "group_size": GROUP}
    )
    params = save_random_run(root / "wd", config)
    model = ParamsModel(config.model)
    forward = jax.jit(lambda p: model.bind(p).layer_weights())(params)
    return config, params, {k: np.asarray(v) for k, v in forward.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, qat_run):
    """The QAT run exported once in every format: format -> directory."""
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export(qat_run[0].workdir, root / fmt, fmt) for fmt in ("ternary", "minicpm", "llama")}


def hf_key(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if module in HIDDEN[:4] else 'mlp'}.{module}.weight"


def hf_forward_weights(cfg, forward: dict, layer: int) -> dict[str, np.ndarray]:
    """The QAT forward's weights of one layer in HF's [out, in] orientation, by HF module name."""
    spec = {s.name.split(".")[-2]: s for s in hf_layout.tensor_plan(cfg, "minicpm") if s.layer == layer}
    return {
        name: hf_layout.to_hf(spec[name], forward[spec[name].param][layer], np.float32) for name in HIDDEN
    }


def test_ternary_export_holds_packed_codes_and_scales(qat_run, exported):
    config, params, forward = qat_run
    cfg = config.model
    out = exported["ternary"]
    hf = json.loads((out / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "mct_ternary"
    assert hf["quantization_config"]["group_size"] == GROUP and hf["architectures"] == ["MiniCPMForCausalLM"]
    with safe_open(out / "model.safetensors", "np") as f:
        for layer in range(cfg.n_layers):
            want = hf_forward_weights(cfg, forward, layer)
            for name in HIDDEN:
                key = hf_key(layer, name)
                packed, scales = f.get_tensor(key), f.get_tensor(key + "_scale")
                n_out, n_in = want[name].shape
                assert packed.dtype == np.uint8 and packed.shape == (n_out, n_in // 4)
                assert scales.dtype == np.float32 and scales.shape == (n_out, n_in // GROUP)
                # code x its group's scale is the weight the QAT forward uses, bit for bit
                dequantised = numpy_unpack(packed) * np.repeat(scales, GROUP, axis=1)
                np.testing.assert_array_equal(dequantised, want[name], err_msg=key)
            q = params["wq"][layer].reshape(cfg.d_model, -1)  # [in, out]
            want_codes, want_scales = numpy_ternary(q, GROUP)
            np.testing.assert_array_equal(
                numpy_unpack(f.get_tensor(f"model.layers.{layer}.self_attn.q_proj.weight")), want_codes.T
            )
            np.testing.assert_allclose(
                f.get_tensor(f"model.layers.{layer}.self_attn.q_proj.weight_scale"), want_scales.T, rtol=1e-6
            )
        np.testing.assert_array_equal(f.get_tensor("lm_head.weight"), params["lm_head"].T)  # high precision
        np.testing.assert_array_equal(f.get_tensor("model.embed_tokens.weight"), params["embed"])


def test_dequantised_exports_equal_the_qat_forward_bit_for_bit(qat_run, exported):
    config, params, forward = qat_run
    cfg = config.model
    mini, llama = exported["minicpm"], exported["llama"]
    assert "quantization_config" not in json.loads((mini / "config.json").read_text())
    branch = np.float32(cfg.scale_depth / math.sqrt(cfg.n_layers))
    with safe_open(mini / "model.safetensors", "np") as m, safe_open(llama / "model.safetensors", "np") as ll:
        for layer in range(cfg.n_layers):
            want = hf_forward_weights(cfg, forward, layer)
            prefix = f"model.layers.{layer}."
            for name in HIDDEN:
                key = hf_key(layer, name)
                np.testing.assert_array_equal(m.get_tensor(key), want[name], err_msg=key)
            np.testing.assert_array_equal(
                ll.get_tensor(prefix + "mlp.down_proj.weight"), want["down_proj"] * branch
            )
            assert (
                len(np.unique(np.abs(m.get_tensor(prefix + "mlp.up_proj.weight")[0, :GROUP]))) <= 2
            )  # {0, s}


def test_import_reads_the_ternary_export_back_to_the_qat_model(tmp_path, qat_run, exported):
    config, params, forward = qat_run
    workdir = import_hf(exported["ternary"], tmp_path / "imported", config=config)
    run = RunCheckpoint(workdir)
    assert run.model_cfg.quant.weights == "none"  # the dequantised weights are the model
    imported = run.read_params()
    for name, value in forward.items():
        np.testing.assert_array_equal(imported[name], value, err_msg=name)
    np.testing.assert_array_equal(imported["lm_head"], params["lm_head"])
    # the imported dense model computes exactly what the QAT model computes
    tokens = jnp.asarray(np.arange(32).reshape(2, 16) % 300, jnp.int32)
    positions, segments = jnp.tile(jnp.arange(16), (2, 1)), jnp.ones((2, 16), jnp.int32)
    qat = ParamsModel(config.model).bind(params)(tokens, positions, segments)
    dense = ParamsModel(run.model_cfg).bind(imported)(tokens, positions, segments)
    np.testing.assert_array_equal(np.asarray(qat), np.asarray(dense))


def test_bad_ternary_input_fails_clearly(tmp_path, qat_run, exported):
    config, _, _ = qat_run
    plain = tiny_run_config(tmp_path / "plain", config.data.mixture["default"].path)
    save_random_run(plain.workdir, plain)
    cli = [
        sys.executable,
        "-m",
        "mct.export",
        f"--workdir={plain.workdir}",
        "--format=ternary",
        f"--out={tmp_path / 'out'}",
    ]
    result = subprocess.run(cli, capture_output=True, text=True)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: ") and "is not a ternary QAT run" in last
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

    out = shutil.copytree(exported["ternary"], tmp_path / "t")
    hf = json.loads((out / "config.json").read_text())
    hf["quantization_config"]["quant_method"] = "bitnet"
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="quant_method 'bitnet' is not supported"):
        import_hf(out, tmp_path / "i1", config=config)
    hf["quantization_config"]["quant_method"] = "mct_ternary"
    (out / "config.json").write_text(json.dumps(hf))
    with safe_open(out / "model.safetensors", "np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = "model.layers.0.mlp.up_proj.weight"
    tensors[key] = tensors[key].astype(np.float32)  # codes not packed
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="must be uint8"):
        import_hf(out, tmp_path / "i2", config=config)
    del tensors[key + "_scale"]
    tensors[key] = tensors[key].astype(np.uint8)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks the tensor 'model.layers.0.mlp.up_proj.weight_scale'"):
        import_hf(out, tmp_path / "i3", config=config)
    assert not (tmp_path / "i1").exists() and not (tmp_path / "i2").exists()
