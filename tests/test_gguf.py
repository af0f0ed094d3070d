"""GGUF export read back with gguf's own GGUFReader: every key llama.cpp's minicpm loader and its gpt2
vocabulary read, the tensors' names, shapes, types and values (q/k rows in llama.cpp's RoPE pair order), the
ternary codes in tq2_0, and bad input failing clearly with nothing left behind."""

import json
import math
import subprocess
import sys

import gguf
import numpy as np
import pytest

from data_pipelines.chat import CHAT_TEMPLATE
from data_pipelines.tokenizer import load_tokenizer
from mct.export.gguf_export import export_gguf
from mct.run.reader import RunCheckpoint
from tests.test_export import LONGROPE, save_random_run, tiny_run_config
from tests.tiny_runs import REPO

QAT_SHAPE = dict(d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_mlp=512)  # rows of whole 256-blocks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.data_fixtures import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("data"), vocab_size=300)


def saved_run(path, dataset, **model):
    config = tiny_run_config(path, dataset, **model)
    params = save_random_run(path, config)
    run = RunCheckpoint(path)
    return run, run.tokenizer(), params


def field(reader: gguf.GGUFReader, key: str):
    assert key in reader.fields, f"missing key {key}"
    return reader.fields[key].contents()


def tensors(reader: gguf.GGUFReader) -> dict:
    return {t.name: t for t in reader.tensors}


def pairs_order(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's RoPE rotates rows (2i, 2i+1) of each head; mct rotates (i, i + head_dim/2): index by index."""
    head_dim = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            out[h * head_dim + 2 * i] = w[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = w[h * head_dim + i + head_dim // 2]
    return out


def test_metadata_holds_every_key_the_minicpm_loader_reads(tmp_path, dataset):
    model = dict(tie_embeddings=False, rope=LONGROPE, max_position=64)  # GQA: 4 query heads over 2 kv heads
    run, tokenizer, params = saved_run(tmp_path / "wd", dataset, **model)
    cfg = run.model_cfg
    reader = gguf.GGUFReader(export_gguf(run, tokenizer, tmp_path / "m.gguf", "f32"))
    a = "minicpm"
    expected = {
        "general.architecture": a,
        f"{a}.context_length": 64,
        f"{a}.embedding_length": 64,
        f"{a}.block_count": 2,
        f"{a}.feed_forward_length": 96,
        f"{a}.attention.head_count": 4,
        f"{a}.attention.head_count_kv": 2,
        f"{a}.attention.key_length": 16,
        f"{a}.attention.value_length": 16,
        f"{a}.rope.dimension_count": 16,
        f"{a}.rope.scaling.type": "longrope",
        f"{a}.rope.scaling.original_context_length": 16,
        "general.file_type": 0,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expected.items():
        assert field(reader, key) == value, key
    approx = {
        f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_eps,
        f"{a}.rope.freq_base": 10000.0,
        f"{a}.embedding_scale": 12.0,
        f"{a}.residual_scale": 1.4 / math.sqrt(2),
        f"{a}.logit_scale": 64 / 256,  # llama.cpp divides the logits by d_model / dim_model_base
        f"{a}.rope.scaling.attn_factor": math.sqrt(1 + math.log(64 / 16) / math.log(16)),
    }
    for key, value in approx.items():
        assert field(reader, key) == pytest.approx(value, rel=1e-6), key
    # the vocabulary: the tokenizer's tokens by id, then unused pads up to vocab_size; specials are control
    vocab = tokenizer.hf.get_vocab()
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size == 320
    assert all(tokens[i] == token for token, i in vocab.items())
    n = len(vocab)
    assert (
        types[:8] == [3] * 8 and set(types[8:n]) == {1} and set(types[n:]) == {5} and tokens[-1] == "[PAD319]"
    )
    merges = json.loads(tokenizer.hf.to_str())["model"]["merges"]
    assert field(reader, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    # tensors: llama.cpp's names, ggml shapes (fastest dimension first), values as mct's HF layout has them
    t = tensors(reader)
    expected_names = {
        "token_embd.weight",
        "output_norm.weight",
        "output.weight",
        "rope_factors_long.weight",
        "rope_factors_short.weight",
    } | {
        f"blk.{i}.{n}.weight"
        for i in range(2)
        for n in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    }
    assert set(t) == expected_names
    assert list(t["blk.1.attn_k.weight"].shape) == [64, 32] and list(t["output.weight"].shape) == [64, 320]
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in t.values())
    np.testing.assert_array_equal(t["rope_factors_long.weight"].data, np.float32(LONGROPE["long_factor"]))
    np.testing.assert_array_equal(t["rope_factors_short.weight"].data, np.float32(LONGROPE["short_factor"]))
    np.testing.assert_array_equal(t["token_embd.weight"].data, params["embed"])
    np.testing.assert_array_equal(t["output.weight"].data, params["lm_head"].T)
    np.testing.assert_array_equal(
        t["blk.1.attn_q.weight"].data, pairs_order(params["wq"][1].reshape(64, -1).T, 4)
    )
    np.testing.assert_array_equal(
        t["blk.0.attn_k.weight"].data, pairs_order(params["wk"][0].reshape(64, -1).T, 2)
    )
    np.testing.assert_array_equal(t["blk.0.attn_v.weight"].data, params["wv"][0].reshape(64, -1).T)
    np.testing.assert_array_equal(t["blk.1.attn_output.weight"].data, params["wo"][1].reshape(-1, 64).T)
    np.testing.assert_array_equal(t["blk.0.ffn_down.weight"].data, params["w_down"][0].T)
    np.testing.assert_array_equal(t["blk.1.ffn_norm.weight"].data, params["mlp_norm"][1])


def test_tied_q8_0_file_quantises_matrices_and_keeps_vectors(tmp_path, dataset):
    run, tokenizer, params = saved_run(tmp_path / "wd", dataset)
    reader = gguf.GGUFReader(export_gguf(run, tokenizer, tmp_path / "m.gguf", "q8_0"))
    t = tensors(reader)
    assert "output.weight" not in t and not any(name.startswith("rope_") for name in t)  # tied, plain RoPE
    assert field(reader, "minicpm.rope.scaling.type") == "none" and field(reader, "general.file_type") == 7
    Q = gguf.GGMLQuantizationType
    assert {
        t[n].tensor_type for n in ("token_embd.weight", "blk.0.ffn_up.weight", "blk.1.attn_q.weight")
    } == {Q.Q8_0}
    assert t["blk.0.attn_norm.weight"].tensor_type == t["output_norm.weight"].tensor_type == Q.F32
    up = gguf.quants.dequantize(t["blk.0.ffn_up.weight"].data, Q.Q8_0)
    ref = params["w_up"][0].T
    assert np.abs(up - ref).max() <= np.abs(ref).max() / 127  # 8 bits per block of 32, one scale each


def numpy_ternary(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and per-group scales of w [out, in] along `in` (BitCPM: s = max(mean |W_g|, 1e-5))."""
    g = w.reshape(w.shape[0], -1, group)
    scale = np.maximum(np.abs(g).mean(-1, keepdims=True), 1e-5)
    return np.clip(np.round(g / scale), -1, 1).reshape(w.shape), np.repeat(scale[..., 0], group, axis=1)


def test_tq2_0_holds_the_qat_codes_with_f16_scales(tmp_path, dataset):
    quant = {"weights": "ternary", "group_size": 256}
    run, tokenizer, params = saved_run(tmp_path / "wd", dataset, **QAT_SHAPE, quant=quant)
    reader = gguf.GGUFReader(export_gguf(run, tokenizer, tmp_path / "m.gguf", "tq2_0"))
    t = tensors(reader)
    Q = gguf.GGMLQuantizationType
    assert t["blk.0.ffn_down.weight"].tensor_type == t["blk.1.attn_q.weight"].tensor_type == Q.TQ2_0
    assert t["token_embd.weight"].tensor_type == Q.F16 and t["blk.0.attn_norm.weight"].tensor_type == Q.F32
    for name, param, layer in (
        ("blk.0.ffn_down.weight", "w_down", 0),
        ("blk.1.attn_output.weight", "wo", 1),
        ("blk.1.ffn_gate.weight", "w_gate", 1),
    ):
        hf = params[param][layer].reshape(-1, 256).T if param == "wo" else params[param][layer].T  # [out, in]
        codes, scales = numpy_ternary(hf, 256)
        stored = gguf.quants.dequantize(t[name].data, Q.TQ2_0)
        np.testing.assert_array_equal(
            stored, codes * scales.astype(np.float16).astype(np.float32), err_msg=name
        )
        assert 0.2 < (codes == 0).mean() < 0.6  # a real ternary mix, not all zeros


def test_bad_input_fails_clearly_and_leaves_nothing(tmp_path, dataset):
    run, tokenizer, _ = saved_run(tmp_path / "wd", dataset)
    with pytest.raises(ValueError, match="tq2_0 needs a ternary QAT run"):
        export_gguf(run, tokenizer, tmp_path / "a.gguf", "tq2_0")
    with pytest.raises(
        ValueError, match="unknown gguf_type 'q3'; choose one of f32, f16, q8_0, q4_k_m, tq2_0"
    ):
        export_gguf(run, tokenizer, tmp_path / "a.gguf", "q3")
    qat, qat_tokenizer, _ = saved_run(
        tmp_path / "qat", dataset, quant={"weights": "ternary", "group_size": 32}
    )
    with pytest.raises(ValueError, match="model.quant.group_size must be a multiple of 256"):
        export_gguf(qat, qat_tokenizer, tmp_path / "a.gguf", "tq2_0")
    other = tmp_path / "tokenizer.json"
    spec = json.loads(tokenizer.hf.to_str())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    other.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="needs a byte-level BPE tokenizer with GPT-2's split"):
        export_gguf(run, load_tokenizer(other), tmp_path / "a.gguf", "f16")
    (tmp_path / "b.gguf").write_text("keep")
    with pytest.raises(FileExistsError):
        export_gguf(run, tokenizer, tmp_path / "b.gguf", "f16")
    assert (tmp_path / "b.gguf").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "qat", "tokenizer.json", "wd"]
    # the CLI: one line, exit 2, for an unknown type (listing the known ones) and tq2_0 of a dense run
    export = [sys.executable, "-m", "mct.export", "--workdir", str(tmp_path / "wd"), "--format", "gguf"]
    for flags, message in (
        (["--gguf_type", "q3"], "unknown gguf_type 'q3'; choose one of f32, f16, q8_0, q4_k_m, tq2_0"),
        (["--gguf_type", "tq2_0"], "tq2_0 needs a ternary QAT run"),
    ):
        result = subprocess.run(
            [*export, *flags, "--out", str(tmp_path / "c.gguf")], capture_output=True, text=True, cwd=REPO
        )
        assert result.returncode == 2, result.stderr
        assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "c.gguf").exists()
