"""Resuming with a changed data.mixture: every kept component continues where it stopped (no document seen
twice, none skipped), added components start at their beginning, removed ones need allow_component_removal.
Checked as a partition: one epoch seen across the change == every component's chunks exactly once. And the
loader on a manifest of a million shards.
"""

import collections
import dataclasses
import json
import shutil

import pytest

from data_pipelines.loader import make_train_iterator, merge_states
from data_pipelines.shards import DatasetError
from tests.data_fixtures import make_tiny_dataset
from tests.test_data_loader import VOCAB, _chunks, _config, _json, _reference_chunks, datasets  # noqa: F401


@pytest.fixture(scope="module")
def gamma(datasets, tmp_path_factory):  # noqa: F811
    """A third dataset with the tokenizer of "a": the component added mid-run."""
    root = tmp_path_factory.mktemp("gamma")
    return make_tiny_dataset(
        root, num_docs=40, seed=3, max_words=120, tag="gamma", tokenizer=str(datasets["a"] / "tokenizer.json")
    )


def _run(cfg, process_count: int, state: dict | None, steps: int | None) -> tuple[collections.Counter, dict]:
    """Chunks seen by `process_count` processes in `steps` steps (None: to the end, where processes stop at
    different steps) and the merged state (None after the end).
    """
    seen, states = collections.Counter(), []
    for p in range(process_count):
        it = make_train_iterator(
            cfg,
            batch_size=2,
            process_index=p,
            process_count=process_count,
            model_vocab_size=VOCAB,
            state=state,
        )
        batches = list(it) if steps is None else [next(it) for _ in range(steps)]
        seen.update(c for b in batches for c in _chunks(b))
        states.append(_json(it.get_state()))
    return seen, None if steps is None else merge_states(states)


@pytest.mark.parametrize("before_processes, after_processes", [(1, 1), (2, 2), (2, 1)])
def test_new_weights_and_an_added_component_partition_the_epoch(
    datasets, gamma, before_processes, after_processes
):
    a, b = str(datasets["a"]), str(datasets["b"])
    before = _config({"a": dict(path=a, weight=2.0), "b": dict(path=b)}, num_epochs=1)
    after = _config(
        {"a": dict(path=a), "b": dict(path=b, weight=3.0), "g": dict(path=str(gamma))}, num_epochs=1
    )
    seen, state = _run(before, before_processes, None, 3)
    # One step under the new mixture, saved mid-switch, resumed again: the switch itself resumes exactly.
    more, state = _run(after, after_processes, state, 1)
    assert any("mixture" in entry for entry in state["shards"].values())  # some shard still drains its batch
    rest, _ = _run(after, after_processes, state, None)
    reference = _reference_chunks(datasets["a"], 64) + _reference_chunks(datasets["b"], 64)
    assert seen + more + rest == reference + _reference_chunks(gamma, 64)


def test_changed_weights_take_effect(datasets):  # noqa: F811
    """The mixer is deterministic, not a random draw: the next chunk comes from the component with the fewest
    tokens per unit of weight (counts restart at the switch). So after every draw a/w_a - b/w_b lies in
    [-seq_len / w_b, seq_len / w_a] (the one drawn was behind before its chunk of <= seq_len pairs), and a
    window from the switch to a packed-batch boundary holds exactly the draws so far. One logical shard: 4 rows
    a packed batch, 2 a step.
    """
    a, b = str(datasets["a"]), str(datasets["b"])
    _, state = _run(_config({"a": dict(path=a), "b": dict(path=b)}, num_logical_shards=1), 1, None, 1)
    cfg = _config({"a": dict(path=a, weight=1.0), "b": dict(path=b, weight=0.25)}, num_logical_shards=1)
    _, state = _run(cfg, 1, state, 1)  # the rest of the old mixture's packed batch; switches at the next row
    seen, _ = _run(cfg, 1, state, 20)  # 10 packed batches of the new weights
    references = {name: _reference_chunks(datasets[name], 64) for name in "ab"}
    tokens = {name: sum((len(c) - 1) * n for c, n in seen.items() if c in references[name]) for name in "ab"}
    assert -64 / 0.25 <= tokens["a"] / 1.0 - tokens["b"] / 0.25 <= 64 / 1.0, (
        tokens
    )  # seen: -46 (a 1862, b 477)
    assert sum(tokens.values()) == sum((len(c) - 1) * n for c, n in seen.items())  # every chunk is a's or b's


def test_removed_component_needs_the_flag_and_then_stops_reading_it(datasets):  # noqa: F811
    a, b = str(datasets["a"]), str(datasets["b"])
    before = _config({"a": dict(path=a), "b": dict(path=b)}, num_epochs=1)
    seen, state = _run(before, 1, None, 3)
    only_a = _config({"a": dict(path=a)}, num_epochs=1)
    with pytest.raises(DatasetError, match=r"\['b'\].*allow_component_removal"):
        _run(only_a, 1, state, 1)
    with pytest.raises(DatasetError, match=r"\['b'\].*allow_component_removal"):
        _run(_config({"a": dict(path=a), "b": dict(path=b, weight=0.0)}, num_epochs=1), 1, state, 1)
    rest, _ = _run(dataclasses.replace(only_a, allow_component_removal=True), 1, state, None)
    reference_a, reference_b = _reference_chunks(datasets["a"], 64), _reference_chunks(datasets["b"], 64)
    total = seen + rest
    assert collections.Counter({c: n for c, n in total.items() if c in reference_a}) == reference_a
    assert all(n == 1 and c in reference_b for c, n in total.items() if c not in reference_a)
    assert 0 < sum(1 for c in total if c in reference_b) < sum(reference_b.values())


def test_a_kept_component_must_read_the_same_documents(datasets):  # noqa: F811
    a, b = str(datasets["a"]), str(datasets["b"])
    _, state = _run(_config({"a": dict(path=a), "b": dict(path=b)}), 1, None, 1)
    with pytest.raises(DatasetError, match="'a' changed its min_tokens"):
        _run(_config({"a": dict(path=a, min_tokens=5), "b": dict(path=b)}), 1, state, 1)


def test_a_manifest_of_a_million_shards_opens_and_iterates(datasets, tmp_path):  # noqa: F811
    """1M manifest entries naming one real shard file (experiments/benchmarks/preprocess.py times it)."""
    small = datasets["a"]
    manifest = json.loads((small / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    manifest["splits"] = {
        "train": {
            "documents": first["documents"] * 10**6,
            "tokens": first["tokens"] * 10**6,
            "shards": [first] * 10**6,
        }
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for name in (first["file"], "tokenizer.json"):
        shutil.copy(small / name, tmp_path / name)
    it = make_train_iterator(
        _config({"big": dict(path=str(tmp_path))}),
        batch_size=8,
        process_index=0,
        process_count=1,
        model_vocab_size=VOCAB,
    )
    reference = _reference_chunks(small, 64)
    assert all(c in reference for c in _chunks(next(it)))
