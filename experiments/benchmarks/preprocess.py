"""Preprocessing throughput per core, stage by stage, and the whole Beam pipeline on the DirectRunner; the
projection to worker-hours for a corpus of --project_tokens tokens.

    python -m experiments.benchmarks.preprocess --files 300 --json

Stages are timed in this process on the same documents (one core): read (prepare's readers), normalise,
exact-dedup key, MinHash signature + LSH band keys (128 permutations, 5-gram shingles), quality score
(fastText, the report's dim 256 and word 3-grams), tokenize (byte-level BPE, prepare's records). Then the
pipeline runs end to end with dedup and the filter on (--direct_num_workers=1, one core) to show what Beam
adds. The projection: bytes of the corpus = tokens x measured bytes per token, divided by the pipeline's
bytes/s per core. The loader's start on a manifest of --manifest_shards shards is timed too.
"""

import json
import pathlib
import tempfile
import time

from absl import flags

from data_pipelines import beam_prepare, dedup, documents, prepare, quality, shards
from data_pipelines import tokenizer as tok
from data_pipelines.config import DataConfig, MixtureComponent
from data_pipelines.loader import make_train_iterator
from data_pipelines.normalise import normalise
from mct.cli.common import run

_FILES = flags.DEFINE_integer("files", 300, "Default-corpus files to process (the first N).")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "BPE trained on the sample.")
_TOKENS = flags.DEFINE_float("project_tokens", 8e12, "Corpus size for the worker-hour projection.")
_MANIFEST = flags.DEFINE_integer("manifest_shards", 1_000_000, "Shards in the synthetic manifest (0: skip).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")


def _timed(fn, items: list) -> tuple[list, float]:
    start = time.perf_counter()
    out = [fn(x) for x in items]
    return out, time.perf_counter() - start


def _loader_start(directory: pathlib.Path, num_shards: int) -> dict:
    """Seconds to open a manifest of num_shards entries (all naming one real shard) and get the first batch."""
    manifest = shards.read_manifest(directory)
    first = manifest["splits"]["train"]["shards"][0]
    manifest["splits"] = {
        "train": {"documents": first["documents"] * num_shards, "tokens": 0, "shards": [first] * num_shards}
    }
    with tempfile.TemporaryDirectory() as tmp:
        big = pathlib.Path(tmp)
        (big / shards.MANIFEST).write_text(json.dumps(manifest))
        for name in (first["file"], tok.TOKENIZER_JSON):
            (big / name).write_bytes((directory / name).read_bytes())
        cfg = DataConfig(seq_len=1024, mixture={"big": MixtureComponent(str(big))})
        start = time.perf_counter()
        iterator = make_train_iterator(
            cfg, batch_size=8, process_index=0, process_count=1, model_vocab_size=manifest["vocab_size"]
        )
        opened = time.perf_counter()
        next(iterator)
        return {"shards": num_shards, "open_s": opened - start, "first_batch_s": time.perf_counter() - opened}


def main(argv: list[str]) -> None:
    del argv
    root, files = documents.default_corpus_files()
    files = [str(p) for p in files[: _FILES.value]]
    docs, read_s = _timed(lambda f: list(documents.read_documents(f, "text")), files)
    docs = [d for file_docs in docs for d in file_docs if isinstance(d, documents.Document)]
    texts = [d.text for d in docs]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tokenizer = tok.train_bpe_tokenizer(texts, _VOCAB.value)
    normalised, normalise_s = _timed(normalise, texts)
    _, exact_s = _timed(dedup.content_hash, normalised)
    settings = dedup.MinHashSettings()
    _, minhash_s = _timed(lambda t: list(dedup.band_keys(dedup.signature(t, settings), settings)), normalised)
    classifier = quality.train_classifier(texts[::2], texts[1::2], quality.TrainSettings())
    _, quality_s = _timed(classifier.score_normalised, normalised)
    records, tokenize_s = _timed(lambda t: prepare.document_records(tokenizer, t, 1_000_000), texts)
    tokens = sum(r.size for rs in records for r in rs)
    stages = {
        "read": read_s,
        "normalise": normalise_s,
        "exact_dedup_key": exact_s,
        "minhash": minhash_s,
        "quality_score": quality_s,
        "tokenize": tokenize_s,
    }
    result = {
        "documents": len(texts),
        "megabytes": megabytes,
        "tokens": int(tokens),
        "bytes_per_token": megabytes * 1e6 / tokens,
        "stages_per_core": {
            name: {"documents_per_s": len(texts) / s, "mb_per_s": megabytes / s} for name, s in stages.items()
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        model = pathlib.Path(tmp) / "quality.bin"
        classifier.save(model)
        tokenizer.save(tmp)
        start = time.perf_counter()
        out = beam_prepare.beam_prepare(
            pathlib.Path(tmp) / "out",
            files,
            dedup_kinds=("exact", "minhash"),
            quality_model=str(model),
            tokenizer_path=str(pathlib.Path(tmp) / "tokenizer.json"),
            progress=False,
            pipeline_args=["--runner=DirectRunner", "--direct_num_workers=1"],
        )
        pipeline_s = time.perf_counter() - start
        result["pipeline_direct_runner_1_worker"] = {
            "seconds": pipeline_s,
            "documents_per_s": len(texts) / pipeline_s,
            "mb_per_s": megabytes / pipeline_s,
            "removed": shards.read_manifest(out)["removed"],
        }
        if _MANIFEST.value:
            result["loader_start"] = _loader_start(out, _MANIFEST.value)
    compute_s = sum(stages.values())
    corpus_mb = _TOKENS.value * result["bytes_per_token"] / 1e6
    result["projection"] = {
        "tokens": _TOKENS.value,
        "corpus_tb": corpus_mb / 1e6,
        "worker_hours_stage_compute": corpus_mb / (megabytes / compute_s) / 3600,
        "worker_hours_direct_runner": corpus_mb
        / result["pipeline_direct_runner_1_worker"]["mb_per_s"]
        / 3600,
    }
    for name, s in result["stages_per_core"].items():
        print(f"{name:>16}: {s['documents_per_s']:9.0f} documents/s {s['mb_per_s']:7.2f} MB/s per core")
    p = result["projection"]
    print(
        f"pipeline on the DirectRunner, 1 worker: {result['pipeline_direct_runner_1_worker']['mb_per_s']:.2f} MB/s;"
        f" {p['tokens']:.0e} tokens = {p['corpus_tb']:.1f} TB: {p['worker_hours_stage_compute']:.0f} core-hours "
        f"of stage compute, {p['worker_hours_direct_runner']:.0f} at the DirectRunner's rate"
    )
    if _JSON.value:
        print(json.dumps(result))


if __name__ == "__main__":
    run(main)
