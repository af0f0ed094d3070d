"""Training and eval batches from prepared datasets with grain, resumable exactly and elastically.

Per logical shard s (of data_cfg.num_logical_shards): every mixture component's documents -> seeded global
shuffle (reshuffled each epoch) -> documents s, s + K, s + 2K, ... -> length filter -> chunks of <= seq_len
pairs -> token-weighted mixture -> grain first-fit packing. Each global batch row reads the logical shard that
batch_layout assigns it, so global batches are the same on any process count; process p owns a contiguous
block of shards. The iterator state holds the step and every owned shard's position (a few integers each,
never per-document state), so a run saved on 4 processes resumes on 2 or 1 with each document seen exactly
once per epoch. With num_epochs > 0 a used-up shard's rows are padding and a process stops once all its
shards are used up (processes may stop at different steps: bound multi-process runs by train.steps).
"""

import dataclasses
import hashlib
import os
import pathlib
from typing import Literal

import grain
import numpy as np
from absl import logging

from data_pipelines import shards
from data_pipelines.batch_layout import BatchLayout
from data_pipelines.config import DataConfig, MixtureComponent
from data_pipelines.mixing import DocumentChunks, TokenWeightedMixture
from data_pipelines.prepare import prepare_default_corpus
from data_pipelines.shards import DatasetError
from data_pipelines.tokenizer import TextTokenizer, TokenizerError, load_tokenizer

DEFAULT_CORPUS = "default"
_STATE_FORMAT = "mct-data-iterator-v2"
Batch = dict[str, np.ndarray]


def cache_root(cache_dir: str) -> pathlib.Path:
    """Where prepared default data lives: data.cache_dir, else $MCT_CACHE, else ~/.cache/mct."""
    return pathlib.Path(cache_dir or os.environ.get("MCT_CACHE") or "~/.cache/mct").expanduser()


def _default_corpus_dir(cache_dir: str, vocab_size: int) -> pathlib.Path:
    return cache_root(cache_dir) / f"default-v{vocab_size}"


def dataset_dir(path: str, *, cache_dir: str, vocab_size: int) -> pathlib.Path:
    """The prepared dataset directory a mixture path names, preparing nothing: "default" is the embedded corpus
    in cache_dir/default-v{vocab_size} (cache_dir "" -> $MCT_CACHE or ~/.cache/mct). DatasetError if unprepared.
    """
    if path == DEFAULT_CORPUS:
        directory = _default_corpus_dir(cache_dir, vocab_size)
    else:
        directory = pathlib.Path(path).expanduser()
    shards.manifest_path(directory)  # raises if never prepared or unfinished
    return directory


def resolve_dataset(path: str, *, cache_dir: str, vocab_size: int) -> pathlib.Path:
    """dataset_dir, preparing the embedded default corpus on first use (training only: readers never prepare)."""
    try:
        return dataset_dir(path, cache_dir=cache_dir, vocab_size=vocab_size)
    except DatasetError:
        if path != DEFAULT_CORPUS:
            raise
    directory = _default_corpus_dir(cache_dir, vocab_size)
    logging.info("preparing the default corpus (Python standard library sources) into %s", directory)
    try:
        prepare_default_corpus(directory, vocab_size)
    except FileExistsError:
        if not (directory / shards.MANIFEST).is_file():  # not just another process finishing first
            raise
    logging.info("default corpus: %s", directory)
    return directory


def dataset_tokenizer(dataset_dir: str | pathlib.Path) -> TextTokenizer:
    """The tokenizer a dataset was prepared with (checked against the manifest's hash)."""
    manifest = shards.read_manifest(dataset_dir)
    try:
        tokenizer = load_tokenizer(dataset_dir)
    except TokenizerError as e:
        raise DatasetError(f"dataset {dataset_dir}: {e}") from None
    if tokenizer.fingerprint != manifest["tokenizer_sha256"]:
        raise DatasetError(
            f"{dataset_dir}'s tokenizer does not match the tokenizer_sha256 in {shards.MANIFEST}"
        )
    return tokenizer


class DataIterator:
    """Batches for one process: dicts of tokens, targets, segment_ids, positions (int32) and loss_mask
    (float32), each [batch_size, seq_len]; row i is global row process_index * batch_size + i, read from the
    logical shard the layout assigns it. get_state() is JSON-able: the step and this process's shards.
    `at_end` says what a shard without more rows gives: "stop" (finite epochs: padding rows, and StopIteration
    once all this process's shards are used up), "pad" (eval: padding rows) or "error" (endless training: a
    shard without a usable document is a DatasetError).
    """

    def __init__(
        self,
        shard_iterators: dict[int, grain.DatasetIterator],
        *,
        layout: BatchLayout,
        process_index: int,
        seq_len: int,
        fingerprint: dict,
        at_end: Literal["stop", "pad", "error"],
        description: str,
    ):
        self._shards, self._layout, self._process_index = shard_iterators, layout, process_index
        self._seq_len, self._fingerprint = seq_len, fingerprint
        self._at_end, self._description = at_end, description
        self._step = 0  # batches emitted; the same on every process
        self._exhausted: set[int] = set()

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> Batch:
        rows = [self._next_row(s) for s in self._layout.row_shards(self._process_index, self._step)]
        if (
            self._at_end == "stop"
            and all(row is None for row in rows)
            and self._exhausted == set(self._shards)
        ):
            raise StopIteration
        self._step += 1
        return _batch(rows, self._seq_len)

    def _next_row(self, shard: int) -> dict[str, np.ndarray] | None:
        """The next packed row of `shard`; None (a padding row) once it has none left."""
        if shard not in self._exhausted:
            try:
                return next(self._shards[shard])
            except StopIteration:
                self._exhausted.add(shard)
        if self._at_end == "error":
            raise DatasetError(
                f"{self._description}: no document passes the mixture's filters in logical shard {shard} of "
                f"{self._layout.num_shards}; use fewer data.num_logical_shards or more data"
            )
        return None

    def get_state(self) -> dict:
        return {
            "format": _STATE_FORMAT,
            "fingerprint": self._fingerprint,
            "step": self._step,
            "shards": {
                str(s): {"exhausted": s in self._exhausted, "pipeline": it.get_state(), **_mixture_entry(it)}
                for s, it in self._shards.items()
            },
        }

    def set_state(self, state: dict) -> None:
        _check_state(state, self._fingerprint)
        for s, it in self._shards.items():
            entry = state["shards"].get(str(s))
            if entry is None:
                raise ValueError(
                    f"data iterator state lacks logical shard {s}: combine every process's "
                    "get_state() with merge_states before resuming on another process count"
                )
            if _saved_mixture(state, s) != _mixture_entry(it).get(
                "mixture", self._fingerprint.get("mixture")
            ):
                raise DatasetError(
                    f"data iterator state of logical shard {s} was saved with another mixture: resume it through "
                    "make_train_iterator(state=...), which continues every component where it stopped"
                )
            it.set_state(entry["pipeline"])
            if entry["exhausted"]:
                self._exhausted.add(s)
            else:
                self._exhausted.discard(s)
        self._step = state["step"]


def merge_states(states: list[dict]) -> dict:
    """One global state from every process's get_state(); set_state accepts it on any process count."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    for i, state in enumerate(states):
        _check_state(state, states[0]["fingerprint"], f"state {i}")
        if state["step"] != states[0]["step"]:
            raise ValueError(
                f"state {i} was saved at data step {state['step']}, state 0 at step {states[0]['step']}: "
                "merge the states of one step"
            )
    merged: dict[str, dict] = {}
    for i, state in enumerate(states):
        for shard, entry in state["shards"].items():
            if shard in merged:
                raise ValueError(f"logical shard {shard} appears in more than one state (again in state {i})")
            merged[shard] = entry
    num_shards = states[0]["fingerprint"]["num_logical_shards"]
    missing = sorted(set(range(num_shards)) - {int(s) for s in merged})
    if missing:
        raise ValueError(f"the states lack logical shards {missing[:10]}...: pass every process's state")
    return {**states[0], "shards": {str(s): merged[str(s)] for s in range(num_shards)}}


def make_train_iterator(
    data_cfg: DataConfig,
    *,
    batch_size: int,
    process_index: int,
    process_count: int,
    model_vocab_size: int,
    state: dict | None = None,
) -> DataIterator:
    """This process's `batch_size` rows of each global batch of batch_size * process_count rows; the global
    batches are the same for any process count (see batch_layout).
    """
    layout = BatchLayout(data_cfg.num_logical_shards, batch_size * process_count, process_count)
    components = _mixture_components(data_cfg, model_vocab_size, "train")
    shard_iterators = {
        s: _packed_shard(
            data_cfg, components, "train", s, layout.num_shards, shuffle=True, num_epochs=data_cfg.num_epochs
        )
        for s in layout.process_shards(process_index)
    }
    fingerprint = _fingerprint(data_cfg, components)
    if state is not None:
        _check_state(state, fingerprint)
        old_components: dict[str, tuple[DataConfig, list[_Component]]] = {}  # one per saved mixture
        for s in shard_iterators:
            saved = _saved_mixture(state, s)
            if saved is None or saved == fingerprint["mixture"]:
                continue
            _check_mixture_change(saved, fingerprint["mixture"], data_cfg.allow_component_removal)
            key = repr(sorted(saved.items()))
            if key not in old_components:
                old_cfg = dataclasses.replace(data_cfg, mixture=_mixture_config(saved))
                old_components[key] = old_cfg, _mixture_components(old_cfg, model_vocab_size, "train")
            old_cfg, old = old_components[key]
            old_iterator = _packed_shard(
                old_cfg, old, "train", s, layout.num_shards, shuffle=True, num_epochs=data_cfg.num_epochs
            )
            shard_iterators[s] = _MixtureSwitch(old_iterator, saved, shard_iterators[s])
    iterator = DataIterator(
        shard_iterators,
        layout=layout,
        process_index=process_index,
        seq_len=data_cfg.seq_len,
        fingerprint=fingerprint,
        at_end="stop" if data_cfg.num_epochs > 0 else "error",
        description=f"train data for process {process_index} of {process_count}",
    )
    if state is not None:
        iterator.set_state(state)
    return iterator


class _MixtureSwitch:
    """A logical shard resumed with a changed mixture (weights, added or removed components). The pipeline it
    was saved with runs until its packer starts a new packed batch, so the rows of the batch in progress come
    out as they would have; then `new` continues every kept component where it stopped (token counts restart
    so the new weights hold from here), added components from their first document. No document is read twice
    or skipped; `mixture` is the saved mixture until the switch, then None.
    """

    def __init__(self, old: grain.DatasetIterator, old_mixture: dict, new: grain.DatasetIterator):
        self._old, self._new, self.mixture = old, new, old_mixture

    def __next__(self) -> dict[str, np.ndarray]:
        if self.mixture is not None:
            if self._old.get_state()["next_row"]:  # inside a packed batch of the old mixture
                try:
                    return next(self._old)
                except StopIteration:
                    pass
            self._switch()
        return next(self._new)

    def _switch(self) -> None:
        state = (
            self._old.get_state()
        )  # grain's packer: the mixture's state at the batch boundary, row counter
        components = state["parent"]["components"]
        self._new.set_state(
            {"parent": {"tokens": {}, "components": components}, "next_row": 0, "counter": state["counter"]}
        )
        self._old, self.mixture = None, None

    def get_state(self) -> dict:
        return (self._new if self.mixture is None else self._old).get_state()

    def set_state(self, state: dict) -> None:
        self._old.set_state(state)


def _mixture_entry(iterator) -> dict:
    """{"mixture": ...} for a shard still running the mixture it was saved with, else {}."""
    if isinstance(iterator, _MixtureSwitch) and iterator.mixture is not None:
        return {"mixture": iterator.mixture}
    return {}


def _saved_mixture(state: dict, shard: int) -> dict | None:
    """The mixture (fingerprint form) logical shard `shard`'s saved position belongs to; None if not saved."""
    entry = state["shards"].get(str(shard))
    return None if entry is None else entry.get("mixture", state["fingerprint"].get("mixture"))


def _mixture_config(mixture: dict) -> dict[str, MixtureComponent]:
    """A fingerprint's mixture as DataConfig.mixture."""
    fields = [f.name for f in dataclasses.fields(MixtureComponent)]
    return {name: MixtureComponent(**{f: c[f] for f in fields}) for name, c in mixture.items()}


def _check_mixture_change(saved: dict, current: dict, allow_removal: bool) -> None:
    """A checkpoint's mixture may become `current` by new weights and new components; a kept component must
    read the same documents; a removed one needs allow_removal.
    """
    for name in sorted(saved.keys() & current.keys()):
        changed = sorted(
            k
            for k in saved[name].keys() | current[name].keys()
            if k != "weight" and saved[name].get(k) != current[name].get(k)
        )
        if changed:
            raise DatasetError(
                f"mixture component {name!r} changed its {', '.join(changed)} since the checkpoint: only its "
                "weight may change when resuming; give the changed dataset a new component name"
            )
    removed = sorted(saved.keys() - current.keys())
    if removed and not allow_removal:
        raise DatasetError(
            f"mixture components {removed} of the checkpoint are missing (or have weight 0): set "
            "data.allow_component_removal=true to stop reading them"
        )


def make_eval_batches(
    data_cfg: DataConfig,
    *,
    batch_size: int,
    num_batches: int,
    process_index: int,
    process_count: int,
    model_vocab_size: int,
) -> list[Batch]:
    """This process's rows of `num_batches` fixed global batches from the eval splits: the logical shards'
    documents in order (cycled if too few), packed, mixed and laid out like training data. Rows of a logical
    shard without eval documents are padding.
    """
    layout = BatchLayout(data_cfg.num_logical_shards, batch_size * process_count, process_count)
    components = _mixture_components(data_cfg, model_vocab_size, "eval")
    shard_iterators = {
        s: _packed_shard(data_cfg, components, "eval", s, layout.num_shards, shuffle=False, num_epochs=0)
        for s in layout.process_shards(process_index)
    }
    iterator = DataIterator(
        shard_iterators,
        layout=layout,
        process_index=process_index,
        seq_len=data_cfg.seq_len,
        fingerprint={},
        at_end="pad",
        description=f"eval data for process {process_index} of {process_count}",
    )
    return [next(iterator) for _ in range(num_batches)]


@dataclasses.dataclass(frozen=True)
class _Component:
    name: str
    config: dict  # path, weight, min_tokens, max_tokens
    documents: shards.ShardedDocuments
    manifest: dict


def _mixture_components(data_cfg: DataConfig, model_vocab_size: int, split: str) -> list[_Component]:
    """The mixture's components with weight > 0, sorted by name, each checked against the model's vocab."""
    mixture = {name: dataclasses.asdict(c) for name, c in data_cfg.mixture.items()}
    if not mixture:
        raise ValueError("data config mixture is empty")
    opened: dict[pathlib.Path, tuple[dict, shards.ShardedDocuments]] = {}  # one reader cache per dataset
    components = []
    for name in sorted(mixture):
        config = _component_config(name, mixture[name])
        if config["weight"] == 0:
            continue
        directory = resolve_dataset(
            config["path"], cache_dir=data_cfg.cache_dir, vocab_size=data_cfg.vocab_size
        )
        if directory not in opened:
            manifest = shards.read_manifest(directory)
            opened[directory] = manifest, shards.ShardedDocuments(directory, manifest, split)
        manifest, documents = opened[directory]
        if manifest["vocab_size"] > model_vocab_size:
            raise DatasetError(
                f"dataset {directory} (mixture component {name!r}) has vocab size "
                f"{manifest['vocab_size']}, more than the model's vocab size {model_vocab_size}"
            )
        if len(documents) == 0:
            raise DatasetError(f"dataset {directory} (mixture component {name!r}) has no {split} documents")
        components.append(_Component(name, config, documents, manifest))
    if not components:
        raise ValueError("data config mixture: every component has weight 0")
    masked = {c.name: bool(c.manifest.get("loss_mask")) for c in components}
    if len(set(masked.values())) > 1:
        raise DatasetError(f"mixture mixes chat datasets (with loss masks) and plain ones: {masked}")
    hashes = {c.name: c.manifest["tokenizer_sha256"][:12] for c in components}
    if len(set(hashes.values())) > 1:
        raise DatasetError(f"mixture components were tokenized with different tokenizers: {hashes}")
    return components


def _component_config(name: str, entry: dict) -> dict:
    """Validated path, weight, min_tokens, max_tokens of one mixture entry."""
    config = {
        "path": entry.get("path"),
        "weight": entry.get("weight", 1.0),
        "min_tokens": entry.get("min_tokens", 0),
        "max_tokens": entry.get("max_tokens", 0),
    }
    if not isinstance(config["path"], str) or not config["path"]:
        raise ValueError(f"data config mixture.{name}.path must name a dataset directory or 'default'")
    if not isinstance(config["weight"], int | float) or config["weight"] < 0:
        raise ValueError(f"data config mixture.{name}.weight must be a number >= 0, got {config['weight']!r}")
    low, high = config["min_tokens"], config["max_tokens"]
    if not (
        isinstance(low, int)
        and isinstance(high, int)
        and low >= 0
        and high >= 0
        and (high == 0 or high >= low)
    ):
        raise ValueError(
            f"data config mixture.{name}: need 0 <= min_tokens <= max_tokens (max 0 = no limit), "
            f"got {low}, {high}"
        )
    return config


def _packed_shard(
    data_cfg: DataConfig,
    components: list[_Component],
    split: str,
    shard: int,
    num_shards: int,
    *,
    shuffle: bool,
    num_epochs: int,
) -> grain.DatasetIterator:
    """Packed rows of one logical shard: {"pairs": [seq_len, 2], "pairs_segment_ids", "pairs_positions"}."""

    def make_streams() -> dict[str, DocumentChunks]:
        streams = {}
        for c in components:
            docs = grain.MapDataset.source(c.documents)
            if shuffle:
                docs = docs.shuffle(seed=_seed(data_cfg.seed, split, c.name))
            streams[c.name] = DocumentChunks(
                docs[shard::num_shards],
                seq_len=data_cfg.seq_len,
                min_tokens=c.config["min_tokens"],
                max_tokens=c.config["max_tokens"],
                num_epochs=num_epochs,
            )
        return streams

    mixture = TokenWeightedMixture(make_streams, {c.name: float(c.config["weight"]) for c in components})
    packed = grain.experimental.FirstFitPackIterDataset(
        mixture,
        length_struct={"pairs": data_cfg.seq_len},
        num_packing_bins=data_cfg.packing_bins,
        seed=_seed(data_cfg.seed, "pack", str(shard)),
        shuffle_bins=shuffle,
    )
    return iter(packed)


def _batch(rows: list[dict[str, np.ndarray] | None], seq_len: int) -> Batch:
    """Stacks packed rows into a batch; None rows (shards without more rows) are padding. Rows of chat datasets
    carry a third column, the target's loss mask (mct/posttrain/chat_data.py)."""
    width = max((row["pairs"].shape[1] for row in rows if row is not None), default=2)
    pairs = np.zeros((len(rows), seq_len, width), np.int32)  # [batch, seq, (input, target[, loss mask])]
    segment_ids = np.zeros((len(rows), seq_len), np.int32)  # 0 = padding
    positions = np.zeros((len(rows), seq_len), np.int32)
    for i, row in enumerate(rows):
        if row is not None:
            pairs[i], segment_ids[i], positions[i] = (
                row["pairs"],
                row["pairs_segment_ids"],
                row["pairs_positions"],
            )
    return {
        "tokens": np.ascontiguousarray(pairs[..., 0]),
        "targets": np.ascontiguousarray(pairs[..., 1]),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_mask": ((segment_ids > 0) & (pairs[..., 2] > 0 if width == 3 else True)).astype(np.float32),
    }


def _seed(*parts: int | str) -> int:
    """A stable 32-bit seed from its parts (grain's shuffle takes seeds below 2**32)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "big")


def _fingerprint(data_cfg: DataConfig, components: list[_Component]) -> dict:
    """What a saved state is only valid for: the settings that decide which rows come out in which order."""
    return {
        "seq_len": data_cfg.seq_len,
        "seed": data_cfg.seed,
        "num_logical_shards": data_cfg.num_logical_shards,
        "packing_bins": data_cfg.packing_bins,
        "num_epochs": data_cfg.num_epochs,
        "mixture": {
            c.name: {
                **c.config,
                "documents": len(c.documents),
                "tokenizer_sha256": c.manifest["tokenizer_sha256"],
            }
            for c in components
        },
    }


def _check_state(state: dict, fingerprint: dict, what: str = "data iterator state") -> None:
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{what} is not a data iterator state ({_STATE_FORMAT})")
    changed = sorted(
        k
        for k in fingerprint.keys() | state["fingerprint"].keys()
        if k != "mixture" and fingerprint.get(k) != state["fingerprint"].get(k)
    )
    if changed:
        raise DatasetError(
            f"{what} was saved with different data settings ({', '.join(changed)}): the run cannot resume its "
            "data exactly; set them back, or start a new workdir (a decay branch may switch the mixture)"
        )
