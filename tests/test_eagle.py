"""EAGLE draft heads: training on a frozen target (the trained head agrees with the target more often than a
random one); decoding with one keeps plain greedy decoding's tokens and the target's sampling distribution, and
drafts only FR-Spec subset ids; a head of another target is named in one line."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.freq_vocab import build_freq_vocab
from data_pipelines.loader import make_eval_batches
from mct.config.posttrain import EagleRunConfig
from mct.errors import UserError
from mct.infer.decoding import Sampling, decode_weights, forward, generate, init_cache, pad_prompts
from mct.infer.eagle import Head, _prefill, draft_chain, head_model
from mct.infer.eagle_decoding import eagle_generate, read_head
from mct.infer.eagle_tree import Tree, TreeShape, keep_path, verify_tree
from mct.model.decoder import ParamsModel
from mct.model.eagle import EagleParams
from mct.posttrain.eagle import WithTarget, eagle_config, eagle_objective, read_target, train_eagle
from mct.run.reader import RunCheckpoint
from tests.test_decoding import full_logits, random_params, tiny_cfg
from tests.test_speculative import assert_second_and_third_follow_the_target
from tests.tiny_runs import make_config, save_params_run

ONE = jax.devices()[:1]


def eagle_run(root, target, dataset, **extra):
    """The tiny config of a head for `target` in root/draft."""
    o = {
        "eagle.target": str(target),
        "train.steps": 20,
        "optimizer.lr": 3e-3,
        "schedule.warmup_steps": 2,
        "schedule.decay_steps": 5,
        "checkpoint.every_steps": 20,
        "checkpoint.async_save": False,
        **extra,
    }
    return make_config(root / "draft", dataset, EagleRunConfig, **o)


@pytest.fixture(scope="module")
def trained_head(pretrained, tmp_path_factory):
    """(draft workdir, its resolved config) of a 40-step head for the tiny pre-trained target."""
    target, dataset = pretrained
    config = eagle_run(tmp_path_factory.mktemp("eagle"), target, dataset)
    train_eagle(config, devices=ONE)
    return config.workdir, eagle_config(config)


def agreement(config: EagleRunConfig, head_params: dict) -> float:
    """The head's top-1 agreement with the target over the held-out batches (the objective's metric)."""
    target = read_target(config.eagle.target)
    model = WithTarget(EagleParams(config.model), ParamsModel(config.model), target.read_params())
    batches = make_eval_batches(
        config.data,
        batch_size=8,
        num_batches=2,
        process_index=0,
        process_count=1,
        model_vocab_size=config.model.vocab_size,
    )
    objective = eagle_objective(1.0, 0.1)
    sums = [objective(model.bind(head_params), b) for b in batches]
    return float(sum(s[2]["top1_agreement"] for s in sums) / sum(s[1] for s in sums))


def test_trained_head_agrees_with_the_target_more_than_a_random_head(trained_head):
    workdir, config = trained_head
    lines = [json.loads(x) for x in open(f"{workdir}/metrics.jsonl")]
    logged = [m for m in lines if "top1_agreement" in m]
    assert {"feature_loss", "token_loss", "top1_agreement"} <= set(logged[-1])
    assert logged[-1]["loss"] < logged[0]["loss"]
    trained = read_target(workdir)
    random_head = EagleParams(config.model).init(0)
    got = agreement(config, trained.checkpoint.read_params(jax.eval_shape(lambda: random_head)))
    assert got > agreement(config, random_head)


def test_greedy_output_equals_plain_greedy_decoding(trained_head):
    workdir, config = trained_head
    target = read_target(config.eagle.target)
    params, head = target.read_params(), read_head(workdir, target)
    prompts = [[1, 17, 3, 8, 40, 41], [1], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
    want = generate(config.model, params, prompts, max_new_tokens=20)
    got, spec = eagle_generate(config.model, params, head, prompts, max_new_tokens=20, num_draft=3)
    assert got == want
    assert 0 < spec.accepted < 3 * spec.rounds  # kept and rejected drafts both happen
    random_head = head_model(config.model).init(1)
    subset = np.arange(0, config.model.vocab_size, 4)
    got, _ = eagle_generate(config.model, params, random_head, prompts, max_new_tokens=20, draft_vocab=subset)
    assert got == want
    eos = want[0][5]
    got, _ = eagle_generate(config.model, params, head, prompts, max_new_tokens=20, eos_id=eos)
    assert got == generate(config.model, params, prompts, max_new_tokens=20, eos_id=eos)


def test_drafts_stay_in_the_frequency_subset():
    cfg = tiny_cfg()
    w = decode_weights(cfg, random_params(cfg, seed=0))
    models = Head(head_model(cfg), w.model)
    head = models.head.init(3)
    subset = jnp.asarray(np.random.default_rng(0).permutation(cfg.vocab_size)[:12], jnp.int32)
    tokens, lengths = pad_prompts([[5, 17, 3], [9]])
    caches = [init_cache(c, 2, 32) for c in (cfg, dataclasses.replace(cfg, n_layers=1))]
    cols = w.head[:, subset]
    sampling = Sampling(temperature=1.0)
    _, state = _prefill(
        models, sampling, w.params, w.head, head, cols, tokens, lengths, *caches, jax.random.key(0)
    )
    drafts, q, _ = draft_chain(models, sampling, 4, w.params, head, cols, subset, state, jax.random.key(1))
    assert np.isin(np.asarray(drafts), np.asarray(subset)).all()
    outside = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(subset))
    assert np.asarray(q)[..., outside].max() == 0
    np.testing.assert_allclose(np.asarray(q).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("tree", [None, TreeShape(top_k=2, depth=2, total_tokens=6)], ids=["chain", "tree"])
def test_sampled_tokens_follow_the_target_distribution(tree):
    cfg = tiny_cfg(vocab_size=12)
    params = random_params(cfg, seed=3)
    head = head_model(cfg).init(4)
    prompt, n = [3, 7, 1], 4000
    out, spec = eagle_generate(
        cfg,
        params,
        head,
        [prompt] * n,
        max_new_tokens=3,
        num_draft=2,
        tree=tree,
        draft_vocab=np.arange(0, 12, 2),
        sampling=Sampling(temperature=1.0, top_p=0.95),
    )
    assert spec.accepted > 0  # the residual draws and the kept drafts both shape the output
    assert_second_and_third_follow_the_target(np.array(out), cfg, params, prompt)


def test_a_head_of_another_target_is_named_with_both_workdirs(trained_head, pretrained, tmp_path):
    workdir, config = trained_head
    _, dataset = pretrained
    other = make_config(tmp_path / "other", dataset, **{"model.d_model": 32, "model.d_mlp": 64})
    save_params_run(tmp_path / "other", other, ParamsModel(other.model).init(0))
    with pytest.raises(
        UserError,
        match=f"{workdir} is a draft head for another target than {tmp_path / 'other'} "
        r"\(d_model 64 vs 32, d_mlp 128 vs 64\)",
    ):
        read_head(workdir, RunCheckpoint(tmp_path / "other"))


def test_tree_verification_sees_each_node_s_path_and_keeps_the_accepted_one():
    """Every tree node's target logits equal a full forward pass over the prompt and its root-to-node path; after
    keep_path the accepted path's keys and values sit where plain decoding of that path puts them."""
    cfg = tiny_cfg()
    w = decode_weights(cfg, random_params(cfg, seed=0))
    models = Head(head_model(cfg), w.model)
    prompt = [5, 17, 3, 8]
    tree = Tree(  # root -> 11 -> (12 -> 14), 13 -> 15; node indices 0..4
        jnp.asarray([[11, 13, 12, 15, 14]], jnp.int32),
        jnp.asarray([[-1, -1, 0, 1, 2]], jnp.int32),
        jnp.asarray([[1, 1, 2, 2, 3]], jnp.int32),
    )
    paths = [[11], [13], [11, 12], [13, 15], [11, 12, 14]]
    n = jnp.asarray([len(prompt)], jnp.int32)
    cache = init_cache(cfg, 1, 32)
    _, cache = forward(w.model, w.params, w.head, jnp.asarray([prompt[:-1]]), jnp.zeros(1, jnp.int32), cache)
    pending = jnp.asarray([[prompt[-1]]], jnp.int32)
    logits, _, cache = verify_tree(models, w.params, w.head, tree, 3, pending, n, cache)
    want = [full_logits(cfg, w.params, prompt)[-1]] + [
        full_logits(cfg, w.params, prompt + p)[-1] for p in paths
    ]
    np.testing.assert_allclose(np.asarray(logits[0]), np.stack(want), atol=2e-4)

    path = jnp.asarray([[1, 3, 5]], jnp.int32)  # block indices of 11, 12, 14
    kept = keep_path(cache, path, n)
    plain = init_cache(cfg, 1, 32)
    _, plain = forward(
        w.model, w.params, w.head, jnp.asarray([prompt + [11, 12, 14]]), jnp.zeros(1, jnp.int32), plain
    )
    end = len(prompt) + 3
    np.testing.assert_allclose(np.asarray(kept.k[:, :, :end]), np.asarray(plain.k[:, :, :end]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(kept.v[:, :, :end]), np.asarray(plain.v[:, :, :end]), atol=1e-5)


def test_tree_drafting_keeps_plain_greedy_output(trained_head):
    workdir, config = trained_head
    target = read_target(config.eagle.target)
    params, head = target.read_params(), read_head(workdir, target)
    prompts = [[1, 17, 3, 8, 40, 41], [1], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49]]
    want = generate(config.model, params, prompts, max_new_tokens=20)
    tree = TreeShape(top_k=3, depth=3, total_tokens=8)
    got, spec = eagle_generate(config.model, params, head, prompts, max_new_tokens=20, tree=tree)
    assert got == want
    assert spec.accepted > 0  # measured: 17 drafts kept over 41 rounds
    subset = np.arange(0, config.model.vocab_size, 8)
    got, _ = eagle_generate(
        config.model, params, head, prompts, max_new_tokens=20, tree=tree, draft_vocab=subset
    )
    assert got == want


def test_generate_cli_drafts_with_the_head_and_names_bad_input(trained_head, pretrained, tmp_path):
    workdir, config = trained_head
    target_dir, dataset = pretrained
    freq = tmp_path / "freq.json"
    freq.write_text(json.dumps(build_freq_vocab(dataset, config.model.vocab_size // 4)))
    target = read_target(str(target_dir))
    prompt = [1] + target.tokenizer().encode_verbatim("the river")
    want = generate(config.model, target.read_params(), [prompt], max_new_tokens=12, eos_id=2)
    generate_cli = [sys.executable, "-m", "mct.generate", f"--workdir={target_dir}", "--prompt=the river"]
    eagle = ["--speculative=eagle", f"--draft_workdir={workdir}", "--max_new_tokens=12"]
    tree = ["--tree_top_k=3", "--tree_depth=3", "--tree_total_tokens=8", f"--freq_vocab={freq}", "--json"]
    printed = subprocess.run(generate_cli + eagle + tree, check=True, capture_output=True, text=True).stdout
    summary = json.loads(printed.splitlines()[-1])
    assert summary["tokens"] == want
    assert summary["accepted_length_mean"] >= 1 and summary["decode_tokens_per_s"] > 0

    record = json.loads(freq.read_text()) | {"tokenizer_sha256": "0" * 64}
    freq.write_text(json.dumps(record))
    bad = subprocess.run(generate_cli + eagle + tree, capture_output=True, text=True)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert last.startswith("error:") and "was counted with another tokenizer" in last

    missing = tmp_path / "no-target"
    cmd = [sys.executable, "-m", "mct.eagle", f"--target={missing}", f"--config.workdir={tmp_path / 'd'}"]
    bad = subprocess.run(cmd, capture_output=True, text=True)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and str(missing) in last
