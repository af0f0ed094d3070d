"""UltraClean quality classifier (MiniCPM4 report section 2.2.1): fastText on verified positives vs raw
negatives, on normalised text (data_pipelines.normalise), retrained iteratively on its own confident predictions.

    python -m data_pipelines.quality train --positives P --negatives N --out MODEL [--rounds R --unlabeled U]
    python -m data_pipelines.quality score --model MODEL --input DOCS.jsonl [--out SCORES.jsonl]
    python -m data_pipelines.quality eval --model MODEL --positives P --negatives N [--plot PNG] [--json]
    python -m data_pipelines.quality train --out MODEL        # the embedded default seeds (below)

P, N, U: text files with one document a line, or JSONL/parquet (--text_field). The report's settings: dim 256,
lr 0.1, word n-grams 3, min count 5, 3 epochs, threshold 0.5; one training thread and a seed make a model
deterministic. Round r > 1 trains on the seeds its predecessor does not confidently contradict plus the
unlabeled documents it labels confidently (score >= --confidence or <= 1 - --confidence).

Embedded default (offline): positives are the standard library's documented modules (a module docstring of at
least 400 characters), negatives its test suite's files (every k-th, as many as positives), cut into
documents of ~2,000 characters; files go to the eval split by a stable hash of their name
(prepare.is_eval_document, 20%). Measured: F1 ~0.81 at 0.5 (python -m data_pipelines.quality eval).
"""

import argparse
import ast
import dataclasses
import json
import pathlib
import sys
import tempfile
from collections.abc import Iterator

import numpy as np

from data_pipelines import documents, prepare
from data_pipelines.extras import import_extra
from data_pipelines.normalise import normalise

POSITIVE, NEGATIVE = "__label__hq", "__label__lq"
_DEFAULT_EVAL_FRACTION = 0.2
_DEFAULT_DOCSTRING_CHARS = 400
_DEFAULT_PIECE_CHARS = 2000  # files are cut into documents of about this size (more, shorter examples)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    dim: int = 256
    lr: float = 0.1
    word_ngrams: int = 3
    min_count: int = 5
    epochs: int = 3
    bucket: int = 1 << 18  # hashed word n-gram rows; fastText's default 2M makes a 2 GB model at dim 256
    seed: int = 0
    rounds: int = 1
    confidence: float = 0.9  # rounds > 1: a prediction this sure relabels (or adds) a document


class Classifier:
    """A trained fastText model: score(text) is P(high quality) in [0, 1]."""

    def __init__(self, model):
        self._model = model

    def score(self, text: str) -> float:
        return self.score_normalised(normalise(text))

    def score_normalised(self, normalised: str) -> float:
        """The score of text already passed through normalise (beam_prepare's documents carry it)."""
        labels, probs = self._model.predict(_one_line(normalised), k=-1, threshold=0.0)
        return float(dict(zip(labels, probs)).get(POSITIVE, 0.0))

    def save(self, path: str | pathlib.Path) -> None:
        self._model.save_model(str(path))


def load_classifier(path: str | pathlib.Path) -> Classifier:
    """A model saved by train; ValueError naming the file when it is missing or not a fastText model."""
    fasttext = import_extra("fasttext", "quality")

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"quality model {path} does not exist")
    try:
        return Classifier(fasttext.load_model(str(path)))
    except ValueError as e:
        raise ValueError(f"quality model {path} is not a fastText model: {e}") from None


def train_classifier(
    positives: list[str], negatives: list[str], settings: TrainSettings, unlabeled: list[str] = ()
) -> Classifier:
    """Trains on the seeds (settings.rounds times, see the module docstring); deterministic for a seed."""
    seeds = [(normalise(t), POSITIVE) for t in positives] + [(normalise(t), NEGATIVE) for t in negatives]
    pool = [normalise(t) for t in unlabeled]
    if not positives or not negatives:
        raise ValueError(f"need positives and negatives, got {len(positives)} and {len(negatives)}")
    classifier = _fit(seeds, settings)
    for _ in range(settings.rounds - 1):
        sure = settings.confidence
        examples = [
            (text, label)
            for text, label in seeds
            if not _confidently(
                classifier.score_normalised(text), NEGATIVE if label == POSITIVE else POSITIVE, sure
            )
        ]
        for text in pool:
            score = classifier.score_normalised(text)
            label = POSITIVE if score >= sure else NEGATIVE if score <= 1 - sure else None
            if label:
                examples.append((text, label))
        classifier = _fit(examples, settings)
    return classifier


def _confidently(score: float, label: str, sure: float) -> bool:
    return score >= sure if label == POSITIVE else score <= 1 - sure


def _fit(examples: list[tuple[str, str]], settings: TrainSettings) -> Classifier:
    fasttext = import_extra("fasttext", "quality")

    order = np.random.default_rng(settings.seed).permutation(
        len(examples)
    )  # SGD on one class, then the other
    with tempfile.NamedTemporaryFile(
        "w", suffix=".txt", encoding="utf-8"
    ) as f:  # would learn the last one only
        f.writelines(f"{examples[i][1]} {_one_line(examples[i][0])}\n" for i in order)
        f.flush()
        model = fasttext.train_supervised(
            input=f.name,
            dim=settings.dim,
            lr=settings.lr,
            wordNgrams=settings.word_ngrams,
            minCount=settings.min_count,
            epoch=settings.epochs,
            bucket=settings.bucket,
            seed=settings.seed,
            thread=1,  # fastText's threads race on shared weights: one thread is reproducible
            verbose=0,
        )
    return Classifier(model)


def _one_line(text: str) -> str:
    return " ".join(text.split())  # fastText reads one example per line


def evaluate(classifier: Classifier, positives: list[str], negatives: list[str], threshold: float) -> dict:
    """Precision, recall and F1 of "score >= threshold" for the positives, and the curve over thresholds."""
    scores = np.array([classifier.score(t) for t in positives + negatives])  # [documents]
    labels = np.array([True] * len(positives) + [False] * len(negatives))
    curve = [_metrics(scores, labels, t) for t in np.linspace(0.0, 1.0, 101)]
    return {
        **_metrics(scores, labels, threshold),
        "positives": len(positives),
        "negatives": len(negatives),
        "curve": curve,
    }


def _metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    predicted = scores >= threshold
    true_pos = int(np.sum(predicted & labels))
    precision = true_pos / max(int(predicted.sum()), 1)
    recall = true_pos / max(int(labels.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": float(threshold), "precision": precision, "recall": recall, "f1": f1}


def plot_curve(result: dict, path: str | pathlib.Path) -> None:
    """Precision, recall and F1 against the threshold, the evaluated threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    thresholds = [c["threshold"] for c in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in ("precision", "recall", "f1"):
        ax.plot(thresholds, [c[metric] for c in curve], label=metric)
    ax.axvline(result["threshold"], color="gray", linestyle="--", linewidth=1)
    ax.set(
        xlabel="threshold (score >= threshold is high quality)",
        ylim=(0, 1.02),
        title=f"quality classifier: F1 {result['f1']:.3f} at {result['threshold']}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_texts(path: str, text_field: str = "text") -> list[str]:
    """Documents of a file: JSONL/parquet records (`text_field`), else one document per non-blank line."""
    files = documents.expand_inputs([path])
    texts: list[str] = []
    for file in files:
        if documents.file_kind(file) in ("jsonl", "parquet"):
            texts += [
                d.text
                for d in documents.read_documents(file, text_field)
                if isinstance(d, documents.Document)
            ]
        else:
            with documents.open_binary(file) as f:
                texts += [
                    line for line in f.read().decode("utf-8", errors="replace").splitlines() if line.strip()
                ]
    return texts


def default_seeds(split: str) -> tuple[list[str], list[str]]:
    """(positives, negatives) of the embedded default's split ("train" or "eval"): documented stdlib modules
    vs stdlib test files.
    """
    root, files = documents.default_corpus_files()
    tests = sorted((root / "test").glob("test_*.py"))

    def in_split(pairs: Iterator[tuple[str, str]]) -> list[str]:
        eval_split = split == "eval"
        return [
            t for name, t in pairs if prepare.is_eval_document(name, _DEFAULT_EVAL_FRACTION) == eval_split
        ]

    positives = _pieces(in_split((n, t) for n, t in _named_sources(root, files) if _documented(t)))
    negatives = _pieces(in_split(_named_sources(root, tests)))
    step = max(len(negatives) // max(len(positives), 1), 1)
    return positives, negatives[::step]  # balanced: the test suite is ~3x larger


def _pieces(texts: list[str]) -> list[str]:
    return [piece for text in texts for piece in documents.text_pieces(text, _DEFAULT_PIECE_CHARS)]


def _named_sources(root: pathlib.Path, files: list[pathlib.Path]) -> Iterator[tuple[str, str]]:
    for path in files:
        try:
            yield path.relative_to(root).as_posix(), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def _documented(source: str) -> bool:
    try:
        docstring = ast.get_docstring(ast.parse(source))
    except (SyntaxError, ValueError):
        return False
    return docstring is not None and len(docstring) >= _DEFAULT_DOCSTRING_CHARS


def _seeds(args: argparse.Namespace, split: str) -> tuple[list[str], list[str]]:
    if bool(args.positives) != bool(args.negatives):
        raise ValueError("pass both --positives and --negatives, or neither (the embedded default)")
    if args.positives:
        return read_texts(args.positives, args.text_field), read_texts(args.negatives, args.text_field)
    return default_seeds(split)


def _train(args: argparse.Namespace) -> None:
    positives, negatives = _seeds(args, "train")
    unlabeled = read_texts(args.unlabeled, args.text_field) if args.unlabeled else []
    settings = TrainSettings(
        dim=args.dim,
        epochs=args.epochs,
        bucket=args.bucket,
        seed=args.seed,
        rounds=args.rounds,
        confidence=args.confidence,
    )
    print(
        f"training on {len(positives)} positives, {len(negatives)} negatives, {len(unlabeled)} unlabeled, "
        f"{settings.rounds} round(s)",
        file=sys.stderr,
    )
    classifier = train_classifier(positives, negatives, settings, unlabeled)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    classifier.save(tmp)
    tmp.replace(out)
    print(f"saved {out}")


def _score(args: argparse.Namespace) -> None:
    classifier = load_classifier(args.model)
    lines = []
    for path in documents.expand_inputs(args.input):
        for item in documents.read_documents(path, args.text_field):
            if isinstance(item, documents.Document):
                lines.append(json.dumps({"source": item.key, "score": round(classifier.score(item.text), 6)}))
            else:
                lines.append(json.dumps({"source": item.source, "skipped": item.reason}))
    text = "".join(line + "\n" for line in lines)
    if args.out:
        pathlib.Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


def _eval(args: argparse.Namespace) -> None:
    classifier = load_classifier(args.model)
    positives, negatives = _seeds(args, "eval")
    result = evaluate(classifier, positives, negatives, args.threshold)
    if args.plot:
        plot_curve(result, args.plot)
    summary = {k: v for k, v in result.items() if k != "curve"}
    print(
        f"precision {summary['precision']:.3f} recall {summary['recall']:.3f} f1 {summary['f1']:.3f} at "
        f"threshold {args.threshold} ({summary['positives']} positives, {summary['negatives']} negatives)"
    )
    if args.json:
        print(json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipelines.quality", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a classifier")
    score = commands.add_parser("score", help="score documents (JSONL lines out)")
    ev = commands.add_parser("eval", help="precision, recall, F1 on labelled documents")
    for p in (train, ev):
        p.add_argument("--positives", help="high-quality documents (default: the embedded seeds)")
        p.add_argument("--negatives", help="low-quality documents")
    for p in (train, score, ev):
        p.add_argument("--text_field", default="text")
    train.add_argument("--out", required=True)
    train.add_argument("--rounds", type=int, default=1)
    train.add_argument("--unlabeled", help="documents the later rounds label confidently")
    train.add_argument("--confidence", type=float, default=TrainSettings.confidence)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--epochs", type=int, default=TrainSettings.epochs, help="passes (more for small data)"
    )
    train.add_argument("--bucket", type=int, default=TrainSettings.bucket, help="hashed n-gram rows")
    train.add_argument("--dim", type=int, default=TrainSettings.dim, help="embedding size")
    score.add_argument("--model", required=True)
    score.add_argument("--input", action="append", required=True)
    score.add_argument("--out")
    ev.add_argument("--model", required=True)
    ev.add_argument("--threshold", type=float, default=0.5)
    ev.add_argument("--plot", help="threshold curve PNG")
    ev.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args(argv)
    try:
        {"train": _train, "score": _score, "eval": _eval}[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
