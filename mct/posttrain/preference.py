"""DPO batches: each preference pair is one packed row, the chosen conversation as segment 1 and the rejected
one as segment 2 (positions restart, attention stays inside a segment), so a pair never straddles devices or
micro-batches. `loss_mask` marks the chosen answer's targets, `rejected_mask` the rejected one's.

Rows are held in memory (preference sets are small); the order is a seeded permutation per epoch and the
iterator state is its step, so a run resumes exactly on any process count (like data_pipelines/loader.py).
"""

import numpy as np

from data_pipelines.chat import encode_chat
from data_pipelines.prepare import is_eval_document
from data_pipelines.shards import DatasetError
from data_pipelines.tokenizer import TextTokenizer
from mct.posttrain.chat_data import read_pairs

_STATE_FORMAT = "mct-preference-iterator-v1"
FIELDS = ("tokens", "targets", "segment_ids", "positions", "loss_mask", "rejected_mask")
Row = dict[str, np.ndarray]  # FIELDS -> [seq_len]


def pair_row(tokenizer: TextTokenizer, pair: dict, seq_len: int) -> Row | None:
    """The packed row of a pair; None when both conversations do not fit seq_len input/target pairs."""
    row = {k: np.zeros(seq_len, np.float32 if k.endswith("mask") else np.int32) for k in FIELDS}
    cursor = 0
    for segment, answer in ((1, "chosen"), (2, "rejected")):
        ids, mask = encode_chat(tokenizer, [*pair["prompt"], pair[answer]])
        n = len(ids) - 1
        if cursor + n > seq_len:
            return None
        span = slice(cursor, cursor + n)
        row["tokens"][span], row["targets"][span] = ids[:-1], ids[1:]
        row["segment_ids"][span], row["positions"][span] = segment, np.arange(n)
        row["loss_mask" if segment == 1 else "rejected_mask"][span] = mask[1:]
        cursor += n
    return row


def pair_rows(
    paths: tuple[str, ...], tokenizer: TextTokenizer, *, seq_len: int, eval_fraction: float
) -> dict[str, dict[str, np.ndarray]]:
    """{"train", "eval"} -> FIELDS -> [rows, seq_len] of every pair that fits; DatasetError naming the files
    when a split has no pair (with loss tokens in both answers)."""
    splits: dict[str, list[Row]] = {"train": [], "eval": []}
    dropped = 0
    for path in paths:
        for key, pair in read_pairs(path):
            row = pair_row(tokenizer, pair, seq_len)
            if row is None or not (row["loss_mask"].any() and row["rejected_mask"].any()):
                dropped += 1
                continue
            splits["eval" if is_eval_document(key, eval_fraction) else "train"].append(row)
    for split, rows in splits.items():
        if not rows:
            raise DatasetError(
                f"preference data {paths}: no {split} pair fits data.seq_len={seq_len} with loss "
                f"tokens in both answers ({dropped} dropped)"
            )
    return {s: {k: np.stack([r[k] for r in rows]) for k in FIELDS} for s, rows in splits.items()}


class PairBatches:
    """This process's rows of each global batch of `rows`, in a seeded permutation per epoch, forever."""

    def __init__(
        self,
        rows: dict[str, np.ndarray],
        *,
        global_batch: int,
        process_index: int,
        process_count: int,
        seed: int,
        tokenizer: TextTokenizer,
    ):
        self._rows, self._n = rows, len(rows["tokens"])
        self._global, self._seed = global_batch, seed
        local = global_batch // process_count
        self._local = slice(process_index * local, (process_index + 1) * local)
        tokenizer_sha256 = tokenizer.fingerprint  # what mct.run.reader checks the tokenizer by
        self._fingerprint = {
            "rows": self._n,
            "seed": seed,
            "global_batch": global_batch,
            "mixture": {"pairs": {"tokenizer_sha256": tokenizer_sha256}},
        }
        self._step = 0

    def __iter__(self) -> "PairBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        index = np.arange(self._step * self._global, (self._step + 1) * self._global)[self._local]
        epochs = index // self._n
        order = {e: np.random.default_rng([self._seed, e]).permutation(self._n) for e in np.unique(epochs)}
        picked = np.array([order[e][i % self._n] for e, i in zip(epochs, index)])
        self._step += 1
        return {k: v[picked] for k, v in self._rows.items()}

    def get_state(self) -> dict:
        return {"format": _STATE_FORMAT, "fingerprint": self._fingerprint, "step": self._step}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise DatasetError(
                f"the checkpoint's data state is not a preference iterator state ({_STATE_FORMAT})"
            )
        if state["fingerprint"] != self._fingerprint:
            raise DatasetError(
                f"the checkpoint's preference data ({state['fingerprint']}) differs from this run's "
                f"({self._fingerprint}): set the data settings back or use a new workdir"
            )
        self._step = state["step"]


def eval_batches(
    rows: dict[str, np.ndarray], *, batch_size: int, num_batches: int, process_index: int, process_count: int
) -> list[dict[str, np.ndarray]]:
    """This process's rows of `num_batches` fixed global batches of the eval pairs, in order (cycled)."""
    n, local = len(rows["tokens"]), batch_size // process_count
    out = []
    for b in range(num_batches):
        index = (np.arange(b * batch_size, (b + 1) * batch_size) % n)[
            process_index * local : (process_index + 1) * local
        ]
        out.append({k: v[index] for k, v in rows.items()})
    return out
