"""Multi-token prediction (mct/model/mtp.py) against the NumPy reference extended by the MTP blocks."""

import jax
import jax.numpy as jnp
import numpy as np

from mct.config.model import model_from_dict
from mct.config.run import Config
from mct.model.decoder import ParamsModel
from mct.model.objectives import pretraining_objective
from mct.train.trainer import build
from tests import reference_model


def tiny_cfg(**overrides):
    shape = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_mlp=96, vocab_size=97)
    return model_from_dict(
        {**shape, "attention": "naive", "mtp": {"depth": 2, "loss_weight": 0.3}, **overrides}
    )


def perturbed(model: ParamsModel, seed: int = 0) -> dict:
    """Random params with non-trivial norms (the MTP blocks' too), so that every weight matters."""
    params = model.init(seed)
    rng = np.random.default_rng(seed)
    for name, value in params.items():
        if "norm" in name:
            params[name] = value + 0.3 * rng.standard_normal(value.shape).astype(np.float32)
    return params


def packed(docs: list[np.ndarray], seq: int) -> dict:
    """The loader's packing: each document's (input, target) pairs in turn, then padding (segment 0)."""
    tokens, targets, seg, pos = (np.zeros(seq, np.int32) for _ in range(4))
    at = 0
    for i, d in enumerate(docs):
        n = len(d) - 1
        tokens[at : at + n], targets[at : at + n] = d[:-1], d[1:]
        seg[at : at + n], pos[at : at + n] = i + 1, np.arange(n)
        at += n
    return {
        "tokens": tokens,
        "targets": targets,
        "segment_ids": seg,
        "positions": pos,
        "loss_mask": (seg > 0).astype(np.float32),
    }


def as_batch(rows: list[dict]) -> dict:
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _ce(logits, targets):
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return lse - logits[np.arange(len(targets)), targets]


def test_mtp_forward_and_loss_match_numpy():
    cfg = tiny_cfg()
    model = ParamsModel(cfg)
    params = perturbed(model)
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, cfg.vocab_size, n) for n in (9, 12)]
    rows = [packed(docs, 24), packed([rng.integers(0, cfg.vocab_size, 25)], 24)]
    total, count, extras = pretraining_objective(model.bind(params), as_batch(rows))
    want_ntp = want_mtp = want_mtp_count = 0.0
    for r in rows:
        seg, s = r["segment_ids"], len(r["tokens"])
        args = (params, cfg, r["tokens"], r["positions"], seg)
        want_ntp += np.sum(_ce(reference_model.logits(*args), r["targets"]) * r["loss_mask"])
        for k, logits in enumerate(reference_model.mtp_logits(*args, r["targets"])):
            for i in range(s - k - 1):  # block k at row i predicts targets[i + k + 1], all in i's document
                if seg[i] and all(seg[i + j] == seg[i] for j in range(k + 2)):
                    want_mtp += _ce(logits[i : i + 1], r["targets"][i + k + 1 : i + k + 2])[0] / cfg.mtp.depth
                    want_mtp_count += 1 / cfg.mtp.depth
    np.testing.assert_allclose(float(extras["ntp_loss"]), want_ntp, rtol=1e-4)
    np.testing.assert_allclose(float(extras["mtp_loss"]), want_mtp, rtol=1e-4)
    np.testing.assert_allclose(float(extras["mtp_tokens"]), want_mtp_count, rtol=1e-6)
    np.testing.assert_allclose(float(total), want_ntp + 0.3 * want_mtp, rtol=1e-4)
    assert float(count) == sum(r["loss_mask"].sum() for r in rows)


def test_no_mtp_target_crosses_a_document_boundary():
    """A packed row's MTP loss is the sum of its documents' MTP losses, each run alone."""
    cfg = tiny_cfg()
    model = ParamsModel(cfg)
    m = model.bind(perturbed(model, 2))
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, cfg.vocab_size, n) for n in (6, 11, 7)]
    _, _, together = pretraining_objective(m, as_batch([packed(docs, 24)]))
    alone = [pretraining_objective(m, as_batch([packed([d], 24)]))[2] for d in docs]
    for key in ("mtp_loss", "mtp_tokens"):
        np.testing.assert_allclose(float(together[key]), sum(float(a[key]) for a in alone), rtol=1e-5)


def test_training_step_reports_both_losses():
    cfg = Config.from_dict(
        {
            "model": {
                "n_layers": 2,
                "d_model": 32,
                "n_heads": 2,
                "n_kv_heads": 2,
                "head_dim": 16,
                "d_mlp": 64,
                "vocab_size": 64,
                "mtp": {"depth": 1},
            },
            "data": {"seq_len": 16},
            "train": {"batch_size": 8, "steps": 4},
            "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
        }
    )
    setup = build(cfg, jax.devices()[:8])
    rng = np.random.default_rng(0)
    rows = [packed([rng.integers(0, 64, n) for n in (7, 10)], 16) for _ in range(8)]
    batch = jax.device_put(as_batch(rows), setup.batch_sharding)
    with jax.set_mesh(setup.mesh):
        _, metrics = setup.step_fn(setup.init_state(0), batch, jnp.int32(0))
    m = {k: float(v) for k, v in metrics.items()}
    assert m["ok"] and 0 < m["mtp_tokens"] < 1
    np.testing.assert_allclose(m["loss"], m["ntp_loss"] + 0.3 * m["mtp_loss"], rtol=1e-5)


def test_exports_drop_the_mtp_block_unless_kept(tmp_path):
    import json

    from safetensors.numpy import load_file

    from mct.export.hf_export import export
    from tests.data_fixtures import make_tiny_dataset
    from tests.test_export import save_random_run, tiny_run_config

    dataset = make_tiny_dataset(tmp_path / "data", vocab_size=300)
    config = tiny_run_config(tmp_path / "wd", dataset, mtp={"depth": 1})
    params = save_random_run(tmp_path / "wd", config)
    for layout in ("llama", "minicpm"):
        dropped = load_file(export(config.workdir, tmp_path / layout, layout) / "model.safetensors")
        assert dropped and not any("mtp" in name for name in dropped)
    kept_dir = export(config.workdir, tmp_path / "kept", "minicpm", keep_mtp=True)
    kept = load_file(kept_dir / "model.safetensors")
    np.testing.assert_array_equal(kept["model.mtp.0.eh_proj.weight"], params["mtp_proj"][0].T)
    np.testing.assert_array_equal(kept["model.mtp.0.final_layernorm.weight"], params["mtp_out_norm"][0])
    assert sum("mtp" in name for name in kept) == 13 and set(dropped) < set(kept)
    assert json.loads((kept_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_mtp_self_speculative_greedy_decoding_equals_plain_decoding():
    from mct.infer.decoding import generate
    from mct.infer.mtp_speculative import mtp_generate

    cfg = tiny_cfg(vocab_size=12, mtp={"depth": 1})
    params = perturbed(ParamsModel(cfg), 4)
    prompts = [[1, 5, 7], [1, 2], [1, 9, 3, 3, 4, 0]]
    want = generate(cfg, params, prompts, max_new_tokens=12)
    got, stats = mtp_generate(cfg, params, prompts, max_new_tokens=12)
    assert got == want
    assert stats.accepted > 0 and stats.mean_accepted_length > 1  # some drafts were kept
