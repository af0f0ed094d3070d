"""data_pipelines.beam_prepare on the DirectRunner: the same dataset as data_pipelines.prepare with dedup and
the filter off; exact and MinHash dedup on planted copies; the quality filter; bad inputs; atomic output.
Each pipeline runs once per module (the DirectRunner takes seconds to start).
"""

import json
import pathlib

import numpy as np
import pytest

from data_pipelines import beam_prepare, prepare, shards
from tests.test_data_prepare import _read_split, corpus  # noqa: F401  (corpus: a fixture)
from tests.test_quality import train_in_fresh_process

_MAX_CHARS = 40  # splits the corpus's longer documents, so split documents are compared too


@pytest.fixture(scope="module")
def local_and_beam(corpus, tmp_path_factory):  # noqa: F811
    root, _, _ = corpus
    out = tmp_path_factory.mktemp("equal")
    settings = dict(vocab_size=300, eval_fraction=0.3, shard_tokens=200, max_document_chars=_MAX_CHARS)
    local = prepare.prepare_dataset(out / "local", [str(root / "*")], workers=1, progress=False, **settings)
    beam = beam_prepare.beam_prepare(
        out / "beam", [str(root / "*")], files_per_writer=3, progress=False, **settings
    )
    return local, beam


def test_beam_without_dedup_writes_what_prepare_writes(local_and_beam):
    local, beam = local_and_beam
    assert (beam / "tokenizer.json").read_bytes() == (local / "tokenizer.json").read_bytes()  # trained alike
    for split in shards.SPLITS:
        ours, theirs = _read_split(beam, split), _read_split(local, split)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)  # same documents, same ids, same order
    ours, theirs = shards.read_manifest(beam), shards.read_manifest(local)
    for field in (
        "documents",
        "tokens",
        "vocab_size",
        "tokenizer_sha256",
        "special_tokens",
        "split_documents",
    ):
        assert ours[field] == theirs[field], field
    assert theirs["split_documents"]["documents"] > 0
    assert ours["skipped"] == theirs["skipped"]  # empty, binary, invalid UTF-8, truncated gzip, missing field
    assert [(s["stage"], s["documents"]) for s in ours["stages"]] == [
        (
            "read",
            theirs["documents"]
            - theirs["split_documents"]["pieces"]
            + theirs["split_documents"]["documents"],
        ),
        ("tokenize", ours["stages"][0]["documents"]),
    ]
    assert ours["stages"][-1]["tokens"] == ours["tokens"]
    assert ours["removed"] == {}


_VOCAB_GOOD = [f"w{i}" for i in range(1000)]
_VOCAB_BAD = [f"zz{i}" for i in range(300)]


def _text(rng: np.random.Generator, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words, size=n))


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory):
    """Originals, planted exact copies (one only re-spaced and re-cased), near-duplicates with 2% of the words
    changed, low-quality documents; deduplicated and filtered. Returns (dataset, expected texts, counts).
    """
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("dedup")
    originals = [_text(rng, _VOCAB_GOOD, 500) for _ in range(12)]
    copies = [originals[1], originals[4], originals[4], "  " + originals[7].upper().replace(" ", "   ")]
    near = []
    for i in (2, 5, 9):
        words = originals[i].split()
        start = int(rng.integers(0, 490))
        words[start : start + 10] = rng.choice(_VOCAB_GOOD, size=10)  # 10 of 500 words: 2%
        near.append(" ".join(words))
    low = [_text(rng, _VOCAB_BAD, 300) for _ in range(5)]
    files = {
        "a.jsonl": originals[:6],
        "b.jsonl": [*originals[6:], *copies[:2]],
        "c.jsonl": [*copies[2:], *near],
        "d.jsonl": low,
    }
    for name, texts in files.items():
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    model = root / "quality.bin"
    seeds = {
        "good.txt": [_text(rng, _VOCAB_GOOD, 60) for _ in range(200)],
        "bad.txt": [_text(rng, _VOCAB_BAD, 60) for _ in range(200)],
    }
    for name, texts in seeds.items():
        (root / "seeds" / name).parent.mkdir(exist_ok=True)
        (root / "seeds" / name).write_text("".join(t + "\n" for t in texts))
    train_in_fresh_process(root / "seeds/good.txt", root / "seeds/bad.txt", model, "--dim", "16")
    out = beam_prepare.beam_prepare(
        root / "out",
        [str(root / "*.jsonl")],
        dedup_kinds=("exact", "minhash"),
        quality_model=str(model),
        vocab_size=400,
        eval_fraction=0.0,
        files_per_writer=1,
        progress=False,
    )
    counts = {"exact duplicate": len(copies), "near duplicate": len(near), "low quality": len(low)}
    return out, originals, counts


def test_dedup_and_quality_remove_exactly_the_planted_documents(dedup_run):
    out, originals, counts = dedup_run
    manifest = shards.read_manifest(out)
    assert manifest["removed"] == counts
    tokenizer = prepare.worker_tokenizer(str(out / "tokenizer.json"))
    kept = [tokenizer.decode(r[1:-1].tolist()) for r in _read_split(out, "train")]
    assert kept == originals  # the first of each cluster, in input order; every distinct document kept
    stages = {s["stage"]: s["documents"] for s in manifest["stages"]}
    assert stages == {"read": 24, "exact_dedup": 20, "minhash_dedup": 17, "quality": 12, "tokenize": 12}
    assert manifest["pipeline"]["minhash_bands"] == [9, 13]


def test_failed_pipeline_leaves_no_output(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "some text here"}) + "\n")

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer crashed")

    monkeypatch.setattr(prepare, "document_records", broken)
    with pytest.raises(Exception, match="tokenizer crashed"):
        beam_prepare.beam_prepare(
            tmp_path / "out", [str(tmp_path / "a.jsonl")], vocab_size=300, progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # neither out nor its temporary sibling


def test_cli_rejects_bad_options_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        beam_prepare.main(["--out", str(tmp_path / "o"), "--dedup", "exact,fuzzy", "--input", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not pathlib.Path(tmp_path / "o").exists()


def test_cli_refuses_a_flag_neither_its_own_nor_beams(tmp_path, capsys):
    """Beam logs and drops options it does not know: a misspelt --dedup would run without dedup."""
    with pytest.raises(SystemExit) as exit_info:
        beam_prepare.main(["--out", str(tmp_path / "o"), "--dedupe", "exact", "--input", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown arguments --dedupe exact") and err.count("\n") == 1
    assert not pathlib.Path(tmp_path / "o").exists()
    beam_prepare.check_pipeline_args(["--runner=DirectRunner", "--direct_num_workers", "2"])  # Beam's own
