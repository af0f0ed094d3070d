"""data_pipelines.prepare: inputs of every kind, skipped records, determinism, atomic output, tokenizer."""

import collections
import gzip
import json
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python import array_record_module

from data_pipelines import documents, prepare, shards
from data_pipelines import tokenizer as tok
from data_pipelines.loader import dataset_tokenizer, resolve_dataset
from data_pipelines.tokenizer import SPECIAL_TOKENS

REPO = pathlib.Path(__file__).resolve().parents[1]


def _jsonl(records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pathlib.Path, list[str], collections.Counter]:
    """A directory of inputs of every supported kind plus broken ones; (dir, valid texts, expected skips)."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [
        f"document number {i}: the river model reads {'shard ' * (i % 7)}data. ü ∑ 🙂 <s> end"
        for i in range(40)
    ]
    (root / "a.txt").write_text(texts[0], encoding="utf-8")
    (root / "b.txt").write_text("  \n ", encoding="utf-8")  # empty document
    (root / "c.txt").write_bytes("caf\xe9 latin-1".encode("latin-1"))  # not UTF-8
    (root / "d.jsonl").write_bytes(
        _jsonl(
            [
                {"text": texts[1]},
                b"{not json",
                {"body": "no text field"},
                {"text": 5},
                {"text": ""},
                b"",
                b'{"text": "caf\xe9"}',
                {"text": texts[2], "meta": 1},
            ]
        )
    )
    (root / "e.jsonl.gz").write_bytes(gzip.compress(_jsonl({"text": t} for t in texts[3:15])))
    (root / "f.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(_jsonl({"text": t} for t in texts[15:27]))
    )
    pq.write_table(pa.table({"text": [*texts[27:40], None], "id": list(range(14))}), root / "g.parquet")
    pq.write_table(pa.table({"body": ["x"]}), root / "h.parquet")  # lacks the text column
    (root / "i.csv").write_text("text\nhello\n")  # unsupported type
    (root / "j.jsonl.gz").write_bytes(
        gzip.compress(_jsonl([{"text": "lost"}] * 50))[:12]
    )  # truncated in the header
    skips = collections.Counter(
        {
            documents.EMPTY: 2,
            documents.NOT_UTF8: 2,
            documents.INVALID_JSON: 1,
            documents.MISSING_FIELD: 3,
            documents.NOT_A_STRING: 1,
            documents.UNSUPPORTED: 1,
            documents.UNREADABLE: 1,
        }
    )
    return root, texts, skips


def _read_split(dataset: pathlib.Path, split: str) -> list[np.ndarray]:
    """Every record of a split, read with array_record directly (independent of the loader)."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    out = []
    for shard in manifest["splits"][split]["shards"]:
        reader = array_record_module.ArrayRecordReader(str(dataset / shard["file"]))
        out += [np.frombuffer(r, dtype="<i4") for r in reader.read_all()]
        reader.close()
    return out


def _tree_bytes(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_prepare_counts_skips_and_round_trip(corpus, tmp_path):
    root, texts, skips = corpus
    out = prepare.prepare_dataset(
        tmp_path / "ds",
        [str(root / "*")],
        vocab_size=300,
        eval_fraction=0.3,
        shard_tokens=200,
        workers=1,
        progress=False,
    )
    manifest = shards.read_manifest(out)
    assert len(manifest["splits"]["train"]["shards"]) > 1  # the eval split's size depends on tmp_path's hash
    assert collections.Counter(manifest["skipped"]["by_reason"]) == skips
    assert manifest["skipped"]["total"] == sum(skips.values())
    assert {"source": f"{root}/d.jsonl:2", "reason": documents.INVALID_JSON} in manifest["skipped"][
        "examples"
    ]
    assert manifest["inputs"] == sorted(str(p) for p in root.iterdir())
    assert manifest["special_tokens"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}

    tokenizer = dataset_tokenizer(out)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    decoded, total_tokens = [], 0
    for split in ("train", "eval"):
        records = _read_split(out, split)
        entry = manifest["splits"][split]
        assert entry["documents"] == len(records) == sum(s["documents"] for s in entry["shards"])
        assert entry["tokens"] == sum(r.size for r in records)
        assert all(s["tokens"] >= 200 for s in entry["shards"][:-1])  # shard_tokens=200 rolls over
        total_tokens += entry["tokens"]
        for record in records:
            assert record[0] == bos and record[-1] == eos and record.max() < manifest["vocab_size"]
            assert bos not in record[1:-1]  # "<s>" inside a text is text, not the control token
            decoded.append(tokenizer.hf.decode(record[1:-1].tolist(), skip_special_tokens=False))
    assert manifest["documents"] == len(texts) and manifest["tokens"] == total_tokens
    assert sorted(decoded) == sorted(texts)  # every valid document once, exactly as written
    assert manifest["splits"]["eval"]["documents"] > 0 and manifest["splits"]["train"]["documents"] > 0


def test_prepare_is_deterministic_and_pool_matches_single_process(corpus, tmp_path):
    root, _, _ = corpus
    runs = [
        prepare.prepare_dataset(
            tmp_path / f"run{i}", [str(root / "*")], vocab_size=300, workers=workers, progress=False
        )
        for i, workers in enumerate((2, 2, 1))
    ]
    first = _tree_bytes(runs[0])
    assert {"manifest.json", "tokenizer.json", "train-00000.arrayrecord"} <= set(first)
    for run in runs[1:]:
        assert _tree_bytes(run) == first


def test_eval_split_follows_the_key_hash(corpus, tmp_path):
    root, texts, _ = corpus
    out = prepare.prepare_dataset(
        tmp_path / "ds",
        [str(root / "e.jsonl.gz")],
        vocab_size=300,
        eval_fraction=0.5,
        workers=1,
        progress=False,
    )
    tokenizer = dataset_tokenizer(out)
    eval_texts = {tokenizer.decode(r[1:-1].tolist()) for r in _read_split(out, "eval")}
    expected = set()
    for line, text in enumerate(texts[3:15], start=1):
        key = f"{root}/e.jsonl.gz:{line}".encode()
        fraction = int.from_bytes(__import__("hashlib").sha256(key).digest()[:8], "big") / 2**64
        if fraction < 0.5:
            expected.add(text)
    assert eval_texts == expected and 0 < len(expected) < 12


def test_a_gzip_file_failing_its_checksum_contributes_nothing_and_is_counted(tmp_path):
    """A gzip stream damaged mid-file decodes to garbage documents before its CRC fails at the end: none of the
    file's documents is kept, and the manifest counts the file as unreadable, naming it."""
    texts = [f"document {i}: the river model reads data" for i in range(40)]
    (tmp_path / "good.jsonl").write_bytes(_jsonl({"text": t} for t in texts))
    stored = gzip.compress(_jsonl({"text": t} for t in texts), compresslevel=0)  # stored blocks: text as is
    third = len(stored) // 3
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(
        stored[:third] + stored[third : 2 * third].replace(b"river", b"xxxxx") + stored[2 * third :]
    )
    assert list(documents.read_documents(str(bad), "text")) == [
        documents.Skipped(str(bad), documents.UNREADABLE)
    ]
    out = prepare.prepare_dataset(
        tmp_path / "ds", [str(tmp_path / "*.jsonl*")], vocab_size=300, workers=1, progress=False
    )
    manifest = shards.read_manifest(out)
    assert manifest["documents"] == len(texts)
    assert manifest["skipped"]["examples"] == [{"source": str(bad), "reason": documents.UNREADABLE}]


def test_interrupted_prepare_leaves_nothing_a_loader_accepts(corpus, tmp_path, monkeypatch):
    root, _, _ = corpus

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(
            tmp_path / "ds", [str(root / "*.txt")], vocab_size=300, workers=1, progress=False
        )
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling
    with pytest.raises(shards.DatasetError, match="no manifest.json"):
        resolve_dataset(str(tmp_path / "ds"), cache_dir="", vocab_size=300)
    # A run killed hard leaves shards without a manifest: still refused.
    half = tmp_path / "half"
    half.mkdir()
    (half / "train-00000.arrayrecord").write_bytes(b"partial")
    with pytest.raises(shards.DatasetError, match="did not finish"):
        resolve_dataset(str(half), cache_dir="", vocab_size=300)


def test_given_tokenizer_is_used_and_validated(corpus, tmp_path):
    root, _, _ = corpus
    first = prepare.prepare_dataset(
        tmp_path / "a", [str(root / "*.jsonl*")], vocab_size=300, workers=1, progress=False
    )
    second = prepare.prepare_dataset(
        tmp_path / "b",
        [str(root / "g.parquet")],
        workers=1,
        progress=False,
        tokenizer_path=str(first / "tokenizer.json"),
    )
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    assert shards.read_manifest(second)["tokenizer_sha256"] == shards.read_manifest(first)["tokenizer_sha256"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        prepare.prepare_dataset(
            tmp_path / "c",
            [str(root / "a.txt")],
            tokenizer_path=str(tmp_path / "bad.json"),
            workers=1,
            progress=False,
        )


def test_bad_inputs_are_clear_errors(corpus, tmp_path):
    root, _, _ = corpus
    with pytest.raises(documents.InputError, match="nothere.jsonl.*no such file"):
        prepare.prepare_dataset(tmp_path / "x", [str(root / "a.txt"), "nothere.jsonl"], workers=1)
    with pytest.raises(documents.InputError, match=r"\*.xyz.*matches no files"):
        prepare.prepare_dataset(tmp_path / "x", [str(root / "*.xyz")], workers=1)
    with pytest.raises(documents.InputError, match="every input was skipped"):
        prepare.prepare_dataset(
            tmp_path / "x", [str(root / "b.txt"), str(root / "i.csv")], workers=1, progress=False
        )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "f").write_text("x")
    with pytest.raises(FileExistsError, match="taken"):
        prepare.prepare_dataset(tmp_path / "taken", [str(root / "a.txt")], workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_reports_a_missing_input_without_a_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.prepare",
            "--input",
            str(tmp_path / "none*.jsonl"),
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "none*.jsonl" in result.stderr and "matches no files" in result.stderr
    assert "Traceback" not in result.stderr


def test_default_corpus_listing():
    root, files = documents.default_corpus_files()
    assert len(files) > 500
    parts = {part for p in files for part in p.relative_to(root).parts[:-1]}
    assert not parts & {"site-packages", "test", "tests", "idlelib"}
    assert all(p.suffix == ".py" for p in files) and root / "argparse.py" in files


def test_default_dataset_is_prepared_once_into_the_cache(tmp_path, monkeypatch):
    root, files = documents.default_corpus_files()
    monkeypatch.setattr(documents, "default_corpus_files", lambda: (root, files[:30]))
    path = resolve_dataset("default", cache_dir=str(tmp_path), vocab_size=300)
    assert path == tmp_path / "default-v300"
    manifest = shards.read_manifest(path)
    assert manifest["inputs"][1:] == [p.relative_to(root).as_posix() for p in files[:30]]
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert resolve_dataset("default", cache_dir=str(tmp_path), vocab_size=300) == path
    assert (path / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt


def _medium_document(num_chars: int) -> str:
    """Words, numbers, punctuation, contractions, emoji and CJK between many kinds of whitespace, with a
    cuttable whitespace (ASCII, before a non-whitespace) at least every 40 characters.
    """
    rng = np.random.default_rng(0)
    words = ["river", "it's", "we'll", "3.14", "12345", "(shard)", "ü∑", "🙂", "数据", "<s>", "--", "x_y"]
    odd = [" ", "  ", "\xa0", "\u3000", "\x1c", "\x0b", " \x0c ", ""]  # inside groups: not all cuttable
    cuttable = [" ", "\n", "  ", "\t", "\n\n", "\r\n", " \n ", "\n   "]
    groups, length = [], 0
    while length < num_chars:
        group = "".join(str(rng.choice(words)) + str(rng.choice(odd)) for _ in range(rng.integers(1, 3)))
        groups.append(group.rstrip() + str(rng.choice(cuttable)))
        length += len(groups[-1])
    return "".join(groups).strip()


def test_text_pieces_encode_to_the_same_ids_and_bpe_as_the_whole_text(monkeypatch):
    text = _medium_document(60_000)
    tokenizer = tok.train_bpe_tokenizer([text], 400)
    whole = tokenizer.encode_ids(text)
    for max_chars in (40, 257, 4096):
        pieces = list(documents.text_pieces(text, max_chars))
        assert "".join(pieces) == text and all(0 < len(p) <= max_chars for p in pieces)
        assert all(p[0] in " \t\n\r" for p in pieces[1:])  # cut at whitespace, never mid-word
        ids = [i for p in pieces for i in tokenizer.encode_ids(p)]
        assert ids == whole, max_chars
    # The tokenizer trained on pieces is the one trained on the whole text (same pre-token counts).
    pieces_bpe = tok.train_bpe_tokenizer(documents.text_pieces(text, 257), 400)
    assert pieces_bpe.files == tokenizer.files
    monkeypatch.setattr(prepare, "_ENCODE_CHARS", 100)
    np.testing.assert_array_equal(prepare.encode_ids(tokenizer, text), whole)


def test_text_pieces_edge_cases():
    assert list(documents.text_pieces("a b", 0)) == ["a b"]  # 0 = no limit
    assert list(documents.text_pieces("a" * 70, 30)) == ["a" * 30, "a" * 30, "a" * 10]  # no whitespace
    assert list(documents.text_pieces("ab  cd ef", 5)) == ["ab ", " cd", " ef"]
    with pytest.raises(ValueError, match="max_chars"):
        list(documents.text_pieces("a", -1))


def test_long_documents_are_split_into_consecutive_documents(tmp_path):
    long_text = " ".join(f"w{i:07d}x" for i in range(550))  # 5499 characters, a space every 10
    short = [f"short document {i}" for i in range(8)]
    (tmp_path / "in.jsonl").write_bytes(_jsonl({"text": t} for t in [short[0], long_text, *short[1:]]))
    out = prepare.prepare_dataset(
        tmp_path / "ds",
        [str(tmp_path / "in.jsonl")],
        vocab_size=300,
        eval_fraction=0.5,
        max_document_chars=1000,
        workers=1,
        progress=False,
    )
    manifest = shards.read_manifest(out)
    assert manifest["split_documents"] == {"documents": 1, "pieces": 6}  # 999 + 4 * 1000 + 500 characters
    assert manifest["max_document_chars"] == 1000
    assert manifest["documents"] == len(short) + 6
    tokenizer = dataset_tokenizer(out)
    records = [(split, r[1:-1]) for split in shards.SPLITS for r in _read_split(out, split)]
    assert manifest["tokens"] == sum(ids.size + 2 for _, ids in records)
    pieces = [
        (split, ids) for split, ids in records if tokenizer.decode(ids.tolist()).lstrip().startswith("w0")
    ]
    assert len(pieces) == 6 and len({split for split, _ in pieces}) == 1  # all in the split of the key
    assert "".join(tokenizer.decode(ids.tolist()) for _, ids in pieces) == long_text
    # Cut at pre-token boundaries: the pieces' ids are exactly the whole text's.
    assert np.concatenate([ids for _, ids in pieces]).tolist() == tokenizer.encode_ids(long_text)


def test_cli_prints_the_skip_and_split_summary(corpus, tmp_path):
    root, texts, skips = corpus
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipelines.prepare",
            "--input",
            str(root / "*"),
            "--out",
            str(tmp_path / "out"),
            "--vocab_size",
            "300",
            "--max_document_chars",
            "60",
            "--workers",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    manifest = shards.read_manifest(tmp_path / "out")
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"prepared {tmp_path / 'out'}: train ")
    assert (
        lines[1]
        == f"skipped {sum(skips.values())}: "
        + ", ".join(f"{n} {reason}" for reason, n in sorted(skips.items()))
        + " (examples in manifest.json)"
    )
    split = manifest["split_documents"]
    assert split["documents"] == sum(len(t) > 60 for t in texts) > 0
    assert (
        lines[2]
        == f"split {split['documents']} documents longer than 60 characters into {split['pieces']} documents"
    )
    assert manifest["documents"] == len(texts) - split["documents"] + split["pieces"]
