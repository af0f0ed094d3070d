"""data_pipelines.loader: packing, mixtures, process shards, global batches independent of the process count,
exact and elastic resume, eval, errors, scale.

References are computed independently: shard records read with array_record directly and cut into chunks
d[kL : kL + L + 1] in NumPy; the loader's rows are cut back into chunks by segment id, compared as multisets.
"""

import collections
import dataclasses
import json
import pathlib
import time

import numpy as np
import pytest
from array_record.python import array_record_module

from data_pipelines import shards
from data_pipelines.config import DataConfig, MixtureComponent, long_context_mixture
from data_pipelines.loader import make_eval_batches, make_train_iterator, merge_states
from data_pipelines.prefetch import prefetch
from data_pipelines.shards import DatasetError
from tests.data_fixtures import make_tiny_dataset

VOCAB = 512


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, pathlib.Path]:
    """Two small datasets sharing one tokenizer ("a", "b") and one with its own tokenizer ("other")."""
    root = tmp_path_factory.mktemp("data")
    a = make_tiny_dataset(root / "a", VOCAB, num_docs=80, seed=0, max_words=120, tag="alpha")
    b = make_tiny_dataset(
        root / "b", num_docs=60, seed=1, max_words=120, tag="beta", tokenizer=str(a / "tokenizer.json")
    )
    other = make_tiny_dataset(root / "other", 300, num_docs=20, seed=2)
    return {"a": a, "b": b, "other": other}


def _config(mixture: dict[str, dict], **overrides) -> DataConfig:
    settings = {**dict(seq_len=64, num_logical_shards=8, packing_bins=4, num_epochs=0), **overrides}
    return DataConfig(mixture={name: MixtureComponent(**c) for name, c in mixture.items()}, **settings)


def _documents(dataset: pathlib.Path, split: str = "train") -> list[np.ndarray]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    docs = []
    for shard in manifest["splits"][split]["shards"]:
        reader = array_record_module.ArrayRecordReader(str(dataset / shard["file"]))
        docs += [np.frombuffer(r, dtype="<i4") for r in reader.read_all()]
    return docs


def _reference_chunks(dataset, seq_len, split="train", min_tokens=0, max_tokens=0) -> collections.Counter:
    """Chunks (as token tuples, inputs plus the last target) that one epoch of the dataset must yield."""
    chunks = collections.Counter()
    for d in _documents(dataset, split):
        if len(d) >= min_tokens and (max_tokens == 0 or len(d) <= max_tokens):
            for start in range(0, len(d) - 1, seq_len):
                chunks[tuple(d[start : start + seq_len + 1].tolist())] += 1
    return chunks


def _chunks(batch: dict[str, np.ndarray]) -> list[tuple]:
    """Cuts packed rows back into chunks, checking the packing invariants on the way."""
    seq_len = batch["tokens"].shape[1]
    for key in ("tokens", "targets", "segment_ids", "positions"):
        assert batch[key].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["loss_mask"], batch["segment_ids"] > 0)
    out = []
    for tokens, targets, segments, positions in zip(
        batch["tokens"], batch["targets"], batch["segment_ids"], batch["positions"]
    ):
        used = int((segments > 0).sum())
        assert (segments[:used] > 0).all() and (segments[used:] == 0).all()  # padding only at the end
        assert (tokens[used:] == 0).all() and (targets[used:] == 0).all()
        ids = segments[:used]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all() and (used == 0 or ids[0] == 1)
        for s in np.unique(ids):
            idx = np.flatnonzero(segments == s)
            np.testing.assert_array_equal(positions[idx], np.arange(idx.size))  # positions restart
            # every target stays inside its document: inside a segment, a token's target is the next token
            np.testing.assert_array_equal(targets[idx[:-1]], tokens[idx[1:]])
            assert idx.size <= seq_len
            out.append((*tokens[idx].tolist(), int(targets[idx[-1]])))
    return out


def _all_chunks(iterator) -> collections.Counter:
    return collections.Counter(c for batch in iterator for c in _chunks(batch))


def _json(state: dict) -> dict:
    return json.loads(json.dumps(state))


def test_one_epoch_is_every_document_packed_once(datasets):
    cfg = _config({"a": dict(path=str(datasets["a"]))}, num_epochs=1, num_logical_shards=4)
    it = make_train_iterator(cfg, batch_size=4, process_index=0, process_count=1, model_vocab_size=VOCAB)
    batches = list(it)
    expected = _reference_chunks(datasets["a"], 64)
    assert max(len(c) for c in expected) == 65 and sum(expected.values()) > len(_documents(datasets["a"]))
    assert _all_chunks(batches) == expected  # long documents split, none dropped or repeated
    real = sum(b["loss_mask"].sum() for b in batches)
    assert real == sum((len(c) - 1) * n for c, n in expected.items())
    # rows of shards that have used up their epoch are padding; packing fills the others
    rows = sum(b["loss_mask"].any(axis=1).sum() for b in batches)
    fill = real / (rows * 64)
    print(f"fill ratio {fill:.3f} of {rows} rows in {len(batches)} batches")
    assert fill > 0.6


def test_mixture_weights_are_realised(datasets):
    cfg = _config(
        {"a": dict(path=str(datasets["a"]), weight=3.0), "b": dict(path=str(datasets["b"]), weight=1.0)},
        num_logical_shards=2,
    )
    it = make_train_iterator(cfg, batch_size=8, process_index=0, process_count=1, model_vocab_size=VOCAB)
    ref_a, ref_b = _reference_chunks(datasets["a"], 64), _reference_chunks(datasets["b"], 64)
    tokens = collections.Counter()
    for _ in range(120):
        for chunk in _chunks(next(it)):
            assert (chunk in ref_a) != (chunk in ref_b)
            tokens["a" if chunk in ref_a else "b"] += len(chunk) - 1
    share = tokens["a"] / (tokens["a"] + tokens["b"])
    assert abs(share - 0.75) < 0.02, share


def test_long_context_mixture_buckets():
    mix = long_context_mixture("/data/long", 32768)
    bounds = [(c.min_tokens, c.max_tokens, c.weight, c.path) for c in mix.values()]
    assert bounds == [
        (0, 4096, 0.25, "/data/long"),
        (4097, 12288, 0.25, "/data/long"),
        (12289, 24576, 0.25, "/data/long"),
        (24577, 32768, 0.25, "/data/long"),
    ]
    assert list(mix) == ["long0_0_4096", "long1_4097_12288", "long2_12289_24576", "long3_24577_32768"]


def test_long_context_buckets_are_realised_equally(datasets):
    max_tokens = 96
    cfg = _config({}, seq_len=max_tokens, num_logical_shards=1, packing_bins=8)
    cfg = dataclasses.replace(cfg, mixture=long_context_mixture(str(datasets["a"]), max_tokens))
    buckets = [(c.min_tokens, c.max_tokens) for c in cfg.mixture.values()]
    lengths = [len(d) for d in _documents(datasets["a"])]
    assert all(sum(lo <= n <= hi for n in lengths) >= 3 for lo, hi in buckets)  # each bucket has documents
    assert max(lengths) > max_tokens  # and some documents are excluded
    it = make_train_iterator(cfg, batch_size=4, process_index=0, process_count=1, model_vocab_size=VOCAB)
    whole_docs = {tuple(d.tolist()) for d in _documents(datasets["a"])}
    tokens = collections.Counter()
    for _ in range(40):
        for chunk in _chunks(next(it)):
            assert chunk in whole_docs  # documents <= max_tokens are never split
            tokens[next(i for i, (lo, hi) in enumerate(buckets) if lo <= len(chunk) <= hi)] += len(chunk) - 1
    shares = np.array([tokens[i] for i in range(4)]) / sum(tokens.values())
    print("bucket token shares", shares)
    np.testing.assert_allclose(shares, 0.25, atol=0.03)


def test_processes_get_disjoint_shards_that_cover_the_data(datasets):
    cfg = _config(
        {"a": dict(path=str(datasets["a"])), "b": dict(path=str(datasets["b"]))},
        num_epochs=1,
        num_logical_shards=6,
    )
    iterators = [
        make_train_iterator(cfg, batch_size=2, process_index=p, process_count=3, model_vocab_size=VOCAB)
        for p in range(3)
    ]
    for p, it in enumerate(iterators):
        assert sorted(map(int, it.get_state()["shards"])) == [2 * p, 2 * p + 1]  # a contiguous block
    per_process = [_all_chunks(it) for it in iterators]
    for p in range(3):
        for q in range(p + 1, 3):
            assert not per_process[p].keys() & per_process[q].keys()
    assert sum(per_process, collections.Counter()) == _reference_chunks(
        datasets["a"], 64
    ) + _reference_chunks(datasets["b"], 64)


@pytest.mark.parametrize("num_shards, batch_size", [(4, 4), (8, 1)])  # K <= B, and K > B (rows rotate)
def test_resume_is_exact_with_packing_and_mixture(datasets, num_shards, batch_size):
    mixture = {
        "a": dict(path=str(datasets["a"]), weight=2.0),
        "b": dict(path=str(datasets["b"]), min_tokens=10),
    }
    cfg = _config(mixture, num_logical_shards=num_shards)
    make = dict(batch_size=batch_size, process_count=2, model_vocab_size=VOCAB)
    runs, states = [], []
    for p in range(2):
        it = make_train_iterator(cfg, process_index=p, **make)
        for _ in range(7):
            next(it)
        states.append(_json(it.get_state()))
        owned = range(p * num_shards // 2, (p + 1) * num_shards // 2)
        assert sorted(map(int, states[-1]["shards"])) == list(owned)  # only its own shards
        assert states[-1]["step"] == 7
        runs.append([next(it) for _ in range(12)])
    merged = merge_states(states)
    for p in range(2):
        for state in (states[p], merged):
            resumed = make_train_iterator(cfg, process_index=p, state=state, **make)
            for expected in runs[p]:
                got = next(resumed)
                for key in expected:
                    np.testing.assert_array_equal(got[key], expected[key])


def test_elastic_resume_4_2_1_sees_every_document_once(datasets):
    cfg = _config(
        {"a": dict(path=str(datasets["a"]), weight=2.0), "b": dict(path=str(datasets["b"]))},
        num_epochs=1,
        num_logical_shards=8,
    )
    seen, state = collections.Counter(), None
    for count, steps in ((4, 3), (2, 4), (1, None)):
        states = []
        for p in range(count):
            it = make_train_iterator(
                cfg, batch_size=2, process_index=p, process_count=count, model_vocab_size=VOCAB, state=state
            )
            batches = list(it) if steps is None else [next(it) for _ in range(steps)]
            seen.update(c for b in batches for c in _chunks(b))
            states.append(_json(it.get_state()))
        state = merge_states(states)
    assert seen == _reference_chunks(datasets["a"], 64) + _reference_chunks(datasets["b"], 64)


def _global_batches(cfg, global_batch: int, process_count: int, steps: int, state=None) -> list[dict]:
    """`steps` global batches: each process's batches concatenated in process order (as a multi-host step
    assembles them with make_array_from_process_local_data), and the merged state after them.
    """
    iterators = [
        make_train_iterator(
            cfg,
            batch_size=global_batch // process_count,
            process_index=p,
            process_count=process_count,
            model_vocab_size=VOCAB,
            state=state,
        )
        for p in range(process_count)
    ]
    batches = []
    for _ in range(steps):
        local = [next(it) for it in iterators]
        batches.append({key: np.concatenate([b[key] for b in local]) for key in local[0]})
    return batches, merge_states([_json(it.get_state()) for it in iterators])


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        for key in y:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# K < B (two rows per shard), K == B, K > B (each row rotates over four shards)
@pytest.mark.parametrize("num_shards, global_batch", [(4, 8), (8, 8), (16, 4)])
def test_global_batches_do_not_depend_on_the_process_count(datasets, num_shards, global_batch):
    mixture = {
        "a": dict(path=str(datasets["a"]), weight=3.0),
        "b": dict(path=str(datasets["b"]), min_tokens=10),
    }
    cfg = _config(mixture, num_logical_shards=num_shards)
    one, _ = _global_batches(cfg, global_batch, 1, steps=9)
    assert all(b["tokens"].shape == (global_batch, 64) for b in one)
    assert np.mean([b["loss_mask"].mean() for b in one]) > 0.6  # real packed data, not padding
    for count in (2, 4):
        _assert_same_batches(_global_batches(cfg, global_batch, count, steps=9)[0], one)


def test_resume_on_another_process_count_continues_the_same_global_batches(datasets):
    cfg = _config(
        {"a": dict(path=str(datasets["a"]), weight=2.0), "b": dict(path=str(datasets["b"]))},
        num_logical_shards=16,
    )
    uninterrupted, _ = _global_batches(cfg, 4, 1, steps=12)
    first, state = _global_batches(cfg, 4, 4, steps=5)  # step 5: mid-rotation over 16 / 4 shards
    assert state["step"] == 5
    _assert_same_batches(first, uninterrupted[:5])
    for count in (2, 1):
        _assert_same_batches(_global_batches(cfg, 4, count, steps=7, state=state)[0], uninterrupted[5:])


def test_eval_batches_do_not_depend_on_the_process_count(datasets):
    # more logical shards than eval documents: the rows of empty shards are padding
    cfg = _config(
        {"a": dict(path=str(datasets["a"])), "b": dict(path=str(datasets["b"]))}, num_logical_shards=32
    )
    assert len(_documents(datasets["a"], "eval")) + len(_documents(datasets["b"], "eval")) < 32
    make = dict(num_batches=8, model_vocab_size=VOCAB)
    one = make_eval_batches(cfg, batch_size=4, process_index=0, process_count=1, **make)
    rows_with_data = np.concatenate([b["loss_mask"].any(axis=1) for b in one])
    assert 0 < rows_with_data.sum() < rows_with_data.size
    for count in (2, 4):
        per_process = [
            make_eval_batches(cfg, batch_size=4 // count, process_index=p, process_count=count, **make)
            for p in range(count)
        ]
        concatenated = [
            {key: np.concatenate([batches[i][key] for batches in per_process]) for key in one[0]}
            for i in range(8)
        ]
        _assert_same_batches(concatenated, one)


def test_resume_cost_does_not_grow_with_steps(datasets, monkeypatch):
    reads = collections.Counter()
    original = shards.ShardedDocuments.__getitem__

    def counting(self, index):
        reads["n"] += 1
        return original(self, index)

    monkeypatch.setattr(shards.ShardedDocuments, "__getitem__", counting)
    cfg = _config({"a": dict(path=str(datasets["a"]))}, num_logical_shards=2)
    make = dict(batch_size=2, process_index=0, process_count=1, model_vocab_size=VOCAB)
    it = make_train_iterator(cfg, **make)
    per_batch = []
    for _ in range(300):  # many epochs of this small dataset
        before = reads["n"]
        next(it)
        per_batch.append(reads["n"] - before)
    run_reads, state = reads["n"], it.get_state()
    reads["n"] = 0
    next(make_train_iterator(cfg, state=state, **make))
    # a resume re-reads the packer's open bins (at most a batch's documents) and reads the next batch; the
    # bound stays far below a replay of the run (largest batch 23-27 reads at the tmp paths seen, run ~1070)
    assert reads["n"] <= 2 * max(per_batch) < run_reads / 10, (reads["n"], max(per_batch), run_reads)


def test_eval_batches_are_fixed_and_split_between_processes(datasets):
    cfg = _config({"a": dict(path=str(datasets["a"]))})
    make = dict(batch_size=2, num_batches=16, process_count=2, model_vocab_size=VOCAB)
    first = make_eval_batches(cfg, process_index=0, **make)
    again = make_eval_batches(cfg, process_index=0, **make)
    other = make_eval_batches(cfg, process_index=1, **make)
    assert len(first) == 16 and all(b["tokens"].shape == (2, 64) for b in first)
    for x, y in zip(first, again):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    reference = _reference_chunks(datasets["a"], 64, split="eval")
    mine, theirs = _all_chunks(first), _all_chunks(other)
    assert mine.keys() <= reference.keys() and theirs.keys() <= reference.keys()
    assert not mine.keys() & theirs.keys()
    assert mine.keys() | theirs.keys() == reference.keys()  # each shard cycles over its few eval documents


def test_bad_inputs_are_clear_errors(datasets, tmp_path):
    make = dict(batch_size=2, process_index=0, process_count=1)
    a = str(datasets["a"])
    vocab = shards.read_manifest(a)["vocab_size"]
    with pytest.raises(DatasetError, match=rf"{a}.*vocab size {vocab}.*model's vocab size {vocab - 1}"):
        make_train_iterator(_config({"x": dict(path=a)}), model_vocab_size=vocab - 1, **make)
    with pytest.raises(DatasetError, match=rf"{tmp_path}.*no manifest.json"):
        make_train_iterator(_config({"x": dict(path=str(tmp_path))}), model_vocab_size=VOCAB, **make)
    with pytest.raises(DatasetError, match="different tokenizers"):
        make_train_iterator(
            _config({"x": dict(path=a), "y": dict(path=str(datasets["other"]))}),
            model_vocab_size=VOCAB,
            **make,
        )
    with pytest.raises(ValueError, match=r"mixture.x.weight"):
        make_train_iterator(_config({"x": dict(path=a, weight=-1.0)}), model_vocab_size=VOCAB, **make)
    with pytest.raises(ValueError, match=r"mixture.x: need 0 <= min_tokens <= max_tokens"):
        make_train_iterator(
            _config({"x": dict(path=a, min_tokens=50, max_tokens=10)}), model_vocab_size=VOCAB, **make
        )
    for num_shards, batch_size, count in ((2, 2, 3), (6, 2, 2), (8, 3, 2)):
        with pytest.raises(
            ValueError, match=rf"num_logical_shards \({num_shards}\).*batch_size \({batch_size * count}\)"
        ):
            make_train_iterator(
                _config({"x": dict(path=a)}, num_logical_shards=num_shards),
                batch_size=batch_size,
                process_index=0,
                process_count=count,
                model_vocab_size=VOCAB,
            )
    with pytest.raises(ValueError, match=r"process index 2 is not in \[0, 2\)"):
        make_train_iterator(
            _config({"x": dict(path=a)}),
            batch_size=2,
            process_index=2,
            process_count=2,
            model_vocab_size=VOCAB,
        )
    with pytest.raises(DatasetError, match="no document passes"):
        next(
            make_train_iterator(
                _config({"x": dict(path=a, min_tokens=10**6)}), model_vocab_size=VOCAB, **make
            )
        )

    state = make_train_iterator(_config({"x": dict(path=a)}), model_vocab_size=VOCAB, **make).get_state()
    with pytest.raises(ValueError, match="different data settings.*seq_len"):
        make_train_iterator(
            _config({"x": dict(path=a)}, seq_len=32), model_vocab_size=VOCAB, state=state, **make
        )
    half = make_train_iterator(
        _config({"x": dict(path=a)}), batch_size=2, process_index=0, process_count=2, model_vocab_size=VOCAB
    ).get_state()
    with pytest.raises(ValueError, match="lack logical shards"):
        merge_states([half])
    with pytest.raises(ValueError, match="more than one state"):
        merge_states([state, state])
    later = make_train_iterator(
        _config({"x": dict(path=a)}), batch_size=2, process_index=1, process_count=2, model_vocab_size=VOCAB
    )
    next(later)
    with pytest.raises(ValueError, match="state 1 was saved at data step 1, state 0 at step 0"):
        merge_states([half, later.get_state()])
    with pytest.raises(ValueError, match="lacks logical shard 4"):
        make_train_iterator(_config({"x": dict(path=a)}), model_vocab_size=VOCAB, state=half, **make)


def test_a_manifest_of_100k_shards_opens_without_touching_files(tmp_path):
    num_shards = 100_000
    manifest = {
        "format": shards.FORMAT,
        "format_version": shards.FORMAT_VERSION,
        "vocab_size": VOCAB,
        "tokenizer_sha256": "0" * 64,
        "special_tokens": {"<s>": 1, "</s>": 2},
        "splits": {
            "train": {
                "documents": 10 * num_shards,
                "tokens": 0,
                "shards": [
                    {"file": f"train-{i:06d}.arrayrecord", "documents": 10, "tokens": 1000}
                    for i in range(num_shards)
                ],
            }
        },
    }
    shards.write_manifest(tmp_path, manifest)  # no shard file exists: opening must be lazy
    cfg = _config({"big": dict(path=str(tmp_path))}, num_logical_shards=64)
    it = make_train_iterator(cfg, batch_size=2, process_index=1, process_count=4, model_vocab_size=VOCAB)
    assert sorted(map(int, it.get_state()["shards"])) == list(range(16, 32))
    with pytest.raises(DatasetError, match=r"cannot open shard .*train-\d{6}.arrayrecord"):
        next(it)


def test_prefetched_state_is_that_of_the_last_batch_consumed(datasets):
    cfg = _config({"a": dict(path=str(datasets["a"]))})
    make = lambda state=None: make_train_iterator(
        cfg, batch_size=4, process_index=0, process_count=1, model_vocab_size=VOCAB, state=state
    )
    plain = [next(it) for it in [make()] for _ in range(6)]
    ahead = prefetch(make(), depth=3)
    for i in range(2):
        np.testing.assert_array_equal(next(ahead)["tokens"], plain[i]["tokens"])
    time.sleep(0.2)  # let the thread run ahead (the queue holds 3 more batches)
    resumed = make(ahead.get_state())
    for i in range(2, 6):
        np.testing.assert_array_equal(next(resumed)["tokens"], plain[i]["tokens"])
    ahead.close()
