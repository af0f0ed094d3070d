"""Data loader throughput on one process: packed (non-padding) tokens per second and fill ratio.

    python -m data_pipelines.prepare --vocab_size 8192 --out /tmp/stdlib
    python -m experiments.benchmarks.data_loader --data /tmp/stdlib --seq 4096 --batch 8 --json

tokens_per_s is the median over batches after warm-up; sustained_tokens_per_s divides all tokens by all time
(it includes the batches that refill a logical shard's packing bins, which the median skips).
"""

import dataclasses
import json
import time

import numpy as np
from absl import app, flags

from data_pipelines.config import DataConfig, MixtureComponent
from data_pipelines.loader import make_train_iterator
from data_pipelines.shards import read_manifest
from mct.cli.common import run

_DATA = flags.DEFINE_string("data", None, "Prepared dataset directory.", required=True)
_SEQ = flags.DEFINE_integer("seq", 4096, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows per batch.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Batches before timing.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Timed batches (at least 20).")
_SHARDS = flags.DEFINE_integer("logical_shards", None, "num_logical_shards (default: the config default).")
_BINS = flags.DEFINE_integer("packing_bins", None, "packing_bins (default: the config default).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def main(argv: list[str]) -> None:
    del argv
    if _BATCHES.value < 20:
        raise app.UsageError("--batches must be at least 20")
    cfg = DataConfig(seq_len=_SEQ.value, mixture={"bench": MixtureComponent(_DATA.value)})
    cfg = dataclasses.replace(
        cfg,
        num_logical_shards=_SHARDS.value or cfg.num_logical_shards,
        packing_bins=_BINS.value or cfg.packing_bins,
    )
    start = time.perf_counter()
    iterator = make_train_iterator(
        cfg,
        batch_size=_BATCH.value,
        process_index=0,
        process_count=1,
        model_vocab_size=read_manifest(_DATA.value)["vocab_size"],
    )
    open_s = time.perf_counter() - start
    for _ in range(_WARMUP.value):
        next(iterator)
    seconds, tokens = [], []
    for _ in range(_BATCHES.value):
        start = time.perf_counter()
        batch = next(iterator)
        seconds.append(time.perf_counter() - start)
        tokens.append(float(batch["loss_mask"].sum()))
    seconds, tokens = np.array(seconds), np.array(tokens)
    result = {
        "tokens_per_s": float(np.median(tokens / seconds)),
        "sustained_tokens_per_s": float(tokens.sum() / seconds.sum()),
        "fill_ratio": float(tokens.sum() / (len(tokens) * _BATCH.value * _SEQ.value)),
        "batches": len(tokens),
        "seq_len": _SEQ.value,
        "batch_size": _BATCH.value,
        "num_logical_shards": cfg.num_logical_shards,
        "packing_bins": cfg.packing_bins,
        "open_s": open_s,
    }
    if _JSON.value:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    run(main)
