"""data_pipelines.prepare on Apache Beam, with deduplication and the UltraClean quality filter: for inputs
too large for one machine (MiniCPM4 trains on ~8T tokens, ~30 TB of text).

    python -m data_pipelines.beam_prepare --input 'raw/*.jsonl.zst' --out DIR --dedup exact,minhash \\
        --quality_model quality.bin --quality_threshold 0.5 --tokenizer tokenizer.json \\
        --runner DataflowRunner ...beam pipeline options...
    python -m data_pipelines.beam_prepare --out DIR       # the embedded default corpus on the DirectRunner

An argument that is neither one of this CLI's flags nor a Beam pipeline option is an error.

Stages: read (prepare's readers and skips) -> normalise (data_pipelines.normalise; documents keep their text)
-> exact dedup (content hash; CombinePerKey keeps the first document in input order) -> MinHash LSH near-dedup
(data_pipelines.dedup: band keys grouped with GroupByKey, so no worker holds the index) -> quality score and
filter (data_pipelines.quality) -> tokenize (prepare's records) -> ArrayRecord shards, written per group of
--files_per_writer input files in input order, and prepare's manifest plus "stages" (documents, characters and
tokens out of each stage) and "removed" (documents by reason). With dedup and the filter off the dataset holds
the documents and token ids data_pipelines.prepare writes for the same inputs and tokenizer, in the same order.

Without --tokenizer a byte-level BPE is trained on the driver from the train split of the first
--tokenizer_sample_files inputs (0: all; at scale pass a tokenizer trained on a sample). The output is written
to a temporary sibling of --out (on a filesystem every worker can write) and renamed when complete.
"""

import argparse
import json
import logging
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np

from data_pipelines.extras import exit_without_extra


def _not_gcp_notice(record: logging.LogRecord) -> bool:
    """Beam's GCP IO warns at import that its optional apitools client is missing; we never use GCP IO."""
    return "apitools not found" not in record.getMessage()


logging.getLogger().addFilter(_not_gcp_notice)
if __name__ == "__main__":  # run as a program without the `beam` extra: one line, before the import fails
    exit_without_extra("apache_beam", "beam")
import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

logging.getLogger().removeFilter(_not_gcp_notice)

from data_pipelines import dedup, documents, prepare, quality, shards  # noqa: E402
from data_pipelines.normalise import normalise  # noqa: E402
from data_pipelines.output_dirs import fresh_directory  # noqa: E402

DEDUP_KINDS = ("exact", "minhash")
_PARTS = ".beam-parts"  # per-writer results inside the temporary output, read by the driver and removed
_READ_SKIPS = "read_skips"
_SKIP_EXAMPLES = 100
# A document between stages: (order, key, text, normalised text); order = (file index, item index in file).
Doc = tuple[tuple[int, int], str, str, str]


def beam_prepare(
    out_dir: str | pathlib.Path,
    inputs: list[str] | None = None,
    *,
    dedup_kinds: tuple[str, ...] = (),
    minhash: dedup.MinHashSettings | None = None,
    quality_model: str | None = None,
    quality_threshold: float = 0.5,
    text_field: str = "text",
    tokenizer_path: str | None = None,
    vocab_size: int = 8192,
    tokenizer_sample_files: int = 0,
    eval_fraction: float = 0.05,
    shard_tokens: int = 1 << 25,
    max_document_chars: int = 1_000_000,
    files_per_writer: int = 64,
    pipeline_args: list[str] | None = None,
    progress: bool = True,
) -> pathlib.Path:
    """Runs the pipeline on `inputs` (paths or globs; None = the default corpus) into `out_dir`; returns it.
    `minhash` None = dedup.MinHashSettings(); `pipeline_args` are Beam pipeline options (default: the
    DirectRunner).
    """
    out = pathlib.Path(out_dir)
    minhash = minhash or dedup.MinHashSettings()
    unknown = set(dedup_kinds) - set(DEDUP_KINDS)
    if unknown:
        raise ValueError(f"--dedup: unknown kinds {sorted(unknown)} (choose from {', '.join(DEDUP_KINDS)})")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if files_per_writer < 1:
        raise ValueError(f"files_per_writer must be >= 1, got {files_per_writer}")
    if quality_model:
        quality.load_classifier(quality_model)  # a bad model file fails here, before any work
    tasks, input_names = prepare.input_tasks(inputs, text_field, max_document_chars)
    start = time.perf_counter()
    with fresh_directory(out) as tmp:
        sample = tasks[:tokenizer_sample_files] if tokenizer_sample_files else tasks
        with prepare.worker_pool(0 if tokenizer_path is None else 1) as imap:
            tokenizer = prepare.dataset_tokenizer(
                imap, sample, tokenizer_path, vocab_size, eval_fraction, progress
            )
        tokenizer.save(tmp)
        (tmp / _PARTS).mkdir()
        options = PipelineOptions(pipeline_args or ["--runner=DirectRunner"])
        with beam.Pipeline(options=options) as pipeline:
            _build(
                pipeline,
                [(i, path, name) for i, (path, name, _, _) in enumerate(tasks)],
                tmp,
                dedup_kinds=dedup_kinds,
                minhash=minhash,
                quality_model=quality_model,
                quality_threshold=quality_threshold,
                text_field=text_field,
                eval_fraction=eval_fraction,
                shard_tokens=shard_tokens,
                max_document_chars=max_document_chars,
                files_per_writer=files_per_writer,
            )
        manifest = _manifest_from_parts(tmp / _PARTS)
        manifest.update(
            prepare.settings_fields(input_names, text_field, eval_fraction, shard_tokens, max_document_chars),
            pipeline={
                "engine": f"apache-beam {beam.__version__}",
                "dedup": list(dedup_kinds),
                "minhash": vars(minhash) if "minhash" in dedup_kinds else None,
                "minhash_bands": dedup.lsh_bands(minhash.threshold, minhash.num_perm)
                if "minhash" in dedup_kinds
                else None,
                "quality_model": quality_model,
                "quality_threshold": quality_threshold if quality_model else None,
                "tokenizer_sample_files": tokenizer_sample_files,
            },
            **prepare.tokenizer_fields(tokenizer, tokenizer_path, vocab_size),
        )
        shards.write_manifest(tmp, manifest)
    if progress:
        seconds = time.perf_counter() - start
        read = manifest["stages"][0]
        stages = ", ".join(f"{s['stage']} {s['documents']}" for s in manifest["stages"])
        print("\n".join(prepare.summary_lines(out, manifest)))
        print(
            f"stages: {stages} documents; "
            f"removed {manifest['removed']}; {read['documents'] / seconds:.0f} documents/s, "
            f"{read['characters'] / seconds / 1e6:.2f} M characters/s in {seconds:.1f} s"
        )
    return out


def _build(pipeline, files: list[tuple[int, str, str]], tmp: pathlib.Path, **s) -> None:
    """The pipeline's transforms; writers put their results under tmp/_PARTS."""
    parts = str(tmp / _PARTS)
    read = (
        pipeline
        | "files" >> beam.Create(files)
        | "spread files" >> beam.Reshuffle()
        | "read" >> beam.FlatMap(_read_file, s["text_field"]).with_outputs(_READ_SKIPS, main="docs")
    )
    stage_counts = [_stage_counts(read.docs, "read")]
    docs = read.docs
    if "exact" in s["dedup_kinds"]:
        docs = (
            docs
            | "content hash" >> beam.Map(lambda d: (dedup.content_hash(d[3]), d))
            | "first per hash" >> beam.CombinePerKey(min)  # order keys are unique and compare first
            | "exact kept" >> beam.Values()
        )
        stage_counts.append(_stage_counts(docs, "exact_dedup"))
    if "minhash" in s["dedup_kinds"]:
        docs = _near_dedup(docs, s["minhash"])
        stage_counts.append(_stage_counts(docs, "minhash_dedup"))
    if s["quality_model"]:
        docs = docs | "quality" >> beam.ParDo(_QualityFilter(s["quality_model"], s["quality_threshold"]))
        stage_counts.append(_stage_counts(docs, "quality"))
    tokenized = docs | "tokenize" >> beam.ParDo(
        _Tokenize(str(tmp), s["eval_fraction"], s["max_document_chars"], s["files_per_writer"])
    )
    stage_counts.append(
        tokenized
        | "count tokenize"
        >> beam.Map(lambda kv: ("tokenize", (1, kv[1][2], sum(len(r) // 4 for r in kv[1][1]))))
        | "sum tokenize" >> beam.CombinePerKey(_sum_tuples)
    )
    _ = (
        tokenized
        | "group writers" >> beam.GroupByKey()
        | "write shards" >> beam.Map(_write_shards, parts, s["shard_tokens"])
    )
    _ = (
        stage_counts
        | "stages" >> beam.Flatten()
        | "stage list" >> beam.combiners.ToList()
        | "write stages" >> beam.Map(_write_json, parts, "stages")
    )
    skips = read[_READ_SKIPS]
    _ = (
        skips
        | "skip reasons" >> beam.Map(lambda sk: (sk[2], 1))
        | "count skips" >> beam.CombinePerKey(sum)
        | "skip list" >> beam.combiners.ToList()
        | "write skips" >> beam.Map(_write_json, parts, "skips")
    )
    _ = (
        skips
        | "first skips" >> beam.combiners.Top.Smallest(_SKIP_EXAMPLES)
        | "write skip examples" >> beam.Map(_write_json, parts, "skip_examples")
    )


def _read_file(file: tuple[int, str, str], text_field: str) -> Iterator:
    """Documents of one input file as Doc tuples; its skips tagged _READ_SKIPS as (order, source, reason)."""
    index, path, name = file
    for item_index, item in enumerate(documents.read_documents(path, text_field, name)):
        order = (index, item_index)
        if isinstance(item, documents.Skipped):
            yield beam.pvalue.TaggedOutput(_READ_SKIPS, (order, item.source, item.reason))
        else:
            yield order, item.key, item.text, normalise(item.text)


def _near_dedup(docs, settings: dedup.MinHashSettings):
    """Docs without the near-duplicates of earlier documents (see data_pipelines.dedup)."""
    by_order = docs | "key by order" >> beam.Map(lambda d: (d[0], d))
    duplicates = (
        docs
        | "band keys" >> beam.FlatMap(_band_entries, settings)
        | "buckets" >> beam.GroupByKey()
        | "bucket duplicates"
        >> beam.FlatMap(lambda kv: dedup.bucket_duplicates(list(kv[1]), settings.threshold))
        | "distinct duplicates" >> beam.Distinct()
        | "mark duplicates" >> beam.Map(lambda order: (order, True))
    )
    return (
        {"doc": by_order, "duplicate": duplicates}
        | "join duplicates" >> beam.CoGroupByKey()
        | "near kept" >> beam.FlatMap(lambda kv: [] if list(kv[1]["duplicate"]) else list(kv[1]["doc"]))
    )


def _band_entries(doc: Doc, settings: dedup.MinHashSettings) -> Iterator:
    """(LSH bucket, (order, signature bytes)) for each band of the document's MinHash signature."""
    sig = dedup.signature(doc[3], settings)
    for bucket in dedup.band_keys(sig, settings):
        yield bucket, (doc[0], sig.tobytes())


class _QualityFilter(beam.DoFn):
    """Keeps documents whose quality score (data_pipelines.quality, on the normalised text) >= threshold."""

    def __init__(self, model_path: str, threshold: float):
        self._model_path, self._threshold = model_path, threshold

    def setup(self):
        self._classifier = quality.load_classifier(self._model_path)

    def process(self, doc: Doc):
        if self._classifier.score_normalised(doc[3]) >= self._threshold:
            yield doc


class _Tokenize(beam.DoFn):
    """Doc -> ((split, writer), (order, records as int32 bytes, characters)): prepare's records and split."""

    def __init__(
        self, tokenizer_file: str, eval_fraction: float, max_document_chars: int, files_per_writer: int
    ):
        self._tokenizer_file, self._eval_fraction = tokenizer_file, eval_fraction
        self._max_document_chars, self._files_per_writer = max_document_chars, files_per_writer

    def setup(self):
        self._tokenizer = prepare.worker_tokenizer(self._tokenizer_file)

    def process(self, doc: Doc):
        order, key, text, _ = doc
        split = "eval" if prepare.is_eval_document(key, self._eval_fraction) else "train"
        records = prepare.document_records(self._tokenizer, text, self._max_document_chars)
        yield (split, order[0] // self._files_per_writer), (order, [r.tobytes() for r in records], len(text))


def _write_shards(group: tuple[tuple[str, int], Iterable], parts: str, shard_tokens: int) -> None:
    """One writer's documents, in input order, into shards {split}-{writer}-{n}; its entry into parts/."""
    (split, writer_index), items = group
    directory = pathlib.Path(parts).parent
    writer = shards.ShardWriter(directory, split, shard_tokens, name_prefix=f"{writer_index:05d}-")
    split_documents = {"documents": 0, "pieces": 0}
    for _, records, _ in sorted(items):
        for record in records:
            writer.write(np.frombuffer(record, dtype=shards.TOKEN_DTYPE))
        if len(records) > 1:
            split_documents["documents"] += 1
            split_documents["pieces"] += len(records)
    entry = {"split": split, "writer": writer_index, **writer.close(), "split_documents": split_documents}
    _write_json(entry, parts, f"writer-{split}-{writer_index:05d}")


def _stage_counts(docs, stage: str):
    """(stage, (documents, characters, tokens 0)) summed over a stage's output documents."""
    return (
        docs
        | f"count {stage}" >> beam.Map(lambda d: (stage, (1, len(d[2]), 0)))
        | f"sum {stage}" >> beam.CombinePerKey(_sum_tuples)
    )


def _sum_tuples(values) -> tuple[int, ...]:
    return tuple(map(sum, zip(*values)))


def _write_json(value, parts: str, name: str) -> None:
    (pathlib.Path(parts) / f"{name}.json").write_text(json.dumps(value), encoding="utf-8")


def _manifest_from_parts(parts: pathlib.Path) -> dict:
    """prepare's manifest from the writers' entries and the counts, plus "stages" and "removed"; removes parts."""
    writers = sorted(
        (json.loads(p.read_text(encoding="utf-8")) for p in parts.glob("writer-*.json")),
        key=lambda e: (e["split"], e["writer"]),
    )
    splits, split_documents = {}, {"documents": 0, "pieces": 0}
    for split in shards.SPLITS:
        entries = [e for e in writers if e["split"] == split]
        splits[split] = {
            "documents": sum(e["documents"] for e in entries),
            "tokens": sum(e["tokens"] for e in entries),
            "shards": [shard for e in entries for shard in e["shards"]],
        }
        for e in entries:
            for k in split_documents:
                split_documents[k] += e["split_documents"][k]
    counts = dict(json.loads((parts / "stages.json").read_text(encoding="utf-8")))
    by_reason = dict(json.loads((parts / "skips.json").read_text(encoding="utf-8")))
    examples = [
        documents.Skipped(source, reason)
        for _, source, reason in json.loads((parts / "skip_examples.json").read_text(encoding="utf-8"))
    ]
    for p in parts.iterdir():
        p.unlink()
    parts.rmdir()
    manifest = prepare.dataset_manifest(splits, prepare.skipped_entry(examples, by_reason), split_documents)
    stages = [
        {
            "stage": stage,
            "documents": n,
            "characters": chars,
            **({"tokens": tokens} if stage == "tokenize" else {}),
        }
        for stage in ("read", "exact_dedup", "minhash_dedup", "quality", "tokenize")
        if stage in counts
        for n, chars, tokens in [counts[stage]]
    ]
    reasons = {"exact_dedup": "exact duplicate", "minhash_dedup": "near duplicate", "quality": "low quality"}
    removed = {
        reasons[b["stage"]]: a["documents"] - b["documents"]
        for a, b in zip(stages, stages[1:])
        if b["stage"] in reasons
    }
    manifest.update(stages=stages, removed=removed)
    return manifest


def _parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.beam_prepare",
        description="Raw text -> deduplicated, quality-filtered ArrayRecord shards on Apache Beam. Options not "
        "listed here are Beam pipeline options (--runner DirectRunner|PrismRunner|DataflowRunner|...).",
    )
    parser.add_argument(
        "--input", action="append", help="File or glob; repeatable. None: the default corpus."
    )
    parser.add_argument("--out", required=True, help="Output dataset directory (must not exist).")
    parser.add_argument("--dedup", default="", help="Comma-separated: exact, minhash (default: none).")
    parser.add_argument("--minhash_threshold", type=float, default=0.8)
    parser.add_argument("--minhash_num_perm", type=int, default=128)
    parser.add_argument("--shingle_words", type=int, default=5)
    parser.add_argument("--quality_model", help="fastText model from python -m data_pipelines.quality train.")
    parser.add_argument("--quality_threshold", type=float, default=0.5)
    parser.add_argument("--text_field", default="text")
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.json, SentencePiece tokenizer.model or HF directory to use instead of training one.",
    )
    parser.add_argument("--vocab_size", type=int, default=None, help="Vocabulary of the trained BPE (8192).")
    parser.add_argument(
        "--tokenizer_sample_files", type=int, default=0, help="Train the BPE on N files (0 all)."
    )
    parser.add_argument("--eval_fraction", type=float, default=0.05)
    parser.add_argument("--shard_tokens", type=int, default=1 << 25)
    parser.add_argument("--max_document_chars", type=int, default=1_000_000)
    parser.add_argument(
        "--files_per_writer",
        type=int,
        default=64,
        help="Input files per shard writer (it holds their tokenized documents to sort them).",
    )
    args, pipeline_args = parser.parse_known_args(argv)
    if args.tokenizer and args.vocab_size is not None:
        parser.error("pass either --tokenizer or --vocab_size, not both")
    return args, pipeline_args


def check_pipeline_args(pipeline_args: list[str]) -> None:
    """ValueError naming the arguments that are neither this CLI's nor a Beam pipeline option: Beam only logs
    and drops those, so a misspelt flag (--dedupe exact) would silently turn its stage off. Beam's parser of
    every registered option is the one its get_all_options builds (and hands to add_extra_args_fn)."""
    parsers = []
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    _, unknown = parsers[0].parse_known_args(pipeline_args)
    if unknown:
        raise ValueError(
            f"unknown arguments {' '.join(unknown)}: neither beam_prepare's (see --help) nor Beam pipeline options"
        )


def main(argv: list[str] | None = None) -> None:
    args, pipeline_args = _parse_args(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--runner") for a in pipeline_args):
        pipeline_args.append("--runner=DirectRunner")
    try:
        check_pipeline_args(pipeline_args)
        beam_prepare(
            args.out,
            args.input,
            dedup_kinds=tuple(k for k in args.dedup.split(",") if k),
            minhash=dedup.MinHashSettings(args.minhash_num_perm, args.minhash_threshold, args.shingle_words),
            quality_model=args.quality_model,
            quality_threshold=args.quality_threshold,
            text_field=args.text_field,
            tokenizer_path=args.tokenizer,
            vocab_size=args.vocab_size or 8192,
            tokenizer_sample_files=args.tokenizer_sample_files,
            eval_fraction=args.eval_fraction,
            shard_tokens=args.shard_tokens,
            max_document_chars=args.max_document_chars,
            files_per_writer=args.files_per_writer,
            pipeline_args=pipeline_args,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
