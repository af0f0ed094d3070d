"""The tokenizers mct reads and writes, behind one interface: the byte-level BPE prepare trains (a HF
`tokenizers` tokenizer.json) and SentencePiece models as OpenBMB releases them (`tokenizer.model` plus its
tokenizer_config.json, data_pipelines/sentencepiece_tokenizer.py).

A tokenizer is stored as files in a directory (a dataset, a workdir, an HF export): `tokenizer.json`, or
`tokenizer.model` with its config files. Its identity (`fingerprint`) hashes those files; for a tokenizer.json
it is the sha256 of the file, as manifests have always recorded it.

Text is encoded as text, nothing added: a special token's string inside a text (`<s>`, `<|im_end|>`) becomes
the ids of its characters, never that control token, so no document, chat message or prompt can forge a
document boundary or a chat turn. Control tokens are inserted by id (`token_to_id`). This is HF tokenizers'
`encode_special_tokens`, transformers' `split_special_tokens`, tiktoken's `allowed_special=()`.
"""

import abc
import dataclasses
import hashlib
import pathlib
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>")
REQUIRED_TOKENS = (BOS, EOS)  # prepare wraps every document as [BOS] + ids + [EOS]
TOKENIZER_JSON, SENTENCEPIECE_MODEL = "tokenizer.json", "tokenizer.model"


class TokenizerError(ValueError):
    """A tokenizer file that is missing, malformed or unusable; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One text's ids and, per id, the (start, end) character span of the text it came from."""

    ids: list[int]
    offsets: list[tuple[int, int]]


class TextTokenizer(abc.ABC):
    """What mct needs of a tokenizer: text <-> ids, the special tokens' ids, and the files that define it."""

    kind: str  # "bpe" | "sentencepiece"
    # Whether consecutive pieces of a text, cut before whitespace (documents.text_pieces), encode to the text's
    # ids: true for GPT-2 pre-tokenization; not for SentencePiece, which starts every text with its "▁".
    piecewise: bool

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a token (a control or added token's string), None when the tokenizer lacks it."""

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """The ids of `texts` as plain text, nothing added (see the module docstring)."""

    @abc.abstractmethod
    def encode_with_offsets(self, texts: Sequence[str]) -> list[Encoded]:
        """encode_texts, with each id's character span (the chat format's loss mask needs them)."""

    @abc.abstractmethod
    def encode_verbatim(self, text: str) -> list[int]:
        """The ids of a raw prompt as llama.cpp and transformers read it: its control and added tokens' strings
        are those tokens (mct.generate without --chat; never used for data)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; control tokens are left out."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Every id the tokenizer can produce, added tokens included."""

    @property
    @abc.abstractmethod
    def files(self) -> dict[str, bytes]:
        """The files that define the tokenizer, by name: what a dataset, a workdir or an export holds."""

    def encode_ids(self, text: str) -> list[int]:
        """The ids of one text (encode_texts' rule)."""
        return self.encode_texts([text])[0]

    def special_token_ids(self) -> dict[str, int]:
        """The ids of those SPECIAL_TOKENS that the tokenizer has."""
        ids = {token: self.token_to_id(token) for token in SPECIAL_TOKENS}
        return {token: i for token, i in ids.items() if i is not None}

    @property
    def fingerprint(self) -> str:
        """The tokenizer's identity: sha256 of tokenizer.json, else of each file's name and sha256."""
        files = self.files
        if set(files) == {TOKENIZER_JSON}:
            return sha256_hex(files[TOKENIZER_JSON])
        return sha256_hex("".join(f"{name}:{sha256_hex(files[name])}\n" for name in sorted(files)).encode())

    def files_in_save_order(self) -> list[tuple[str, bytes]]:
        """(name, bytes) of the files, the main file (tokenizer.json / tokenizer.model) last: a reader looks
        for it, so it finds the others written before it."""
        return sorted(self.files.items(), key=lambda item: item[0] in _MAIN_FILES)

    def save(self, directory: str | pathlib.Path) -> None:
        """Writes the tokenizer's files into `directory`."""
        for name, data in self.files_in_save_order():
            (pathlib.Path(directory) / name).write_bytes(data)


_MAIN_FILES = (TOKENIZER_JSON, SENTENCEPIECE_MODEL)


class BpeTokenizer(TextTokenizer):
    """A HF `tokenizers` tokenizer.json (the byte-level BPE prepare trains, or any other)."""

    kind, piecewise = "bpe", True

    def __init__(self, hf: Tokenizer):
        self.hf = hf  # the HF tokenizer, for the exports that write its format

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode(self.hf.encode_batch_fast, texts)]

    def encode_with_offsets(self, texts: Sequence[str]) -> list[Encoded]:
        return [Encoded(e.ids, e.offsets) for e in self._encode(self.hf.encode_batch, texts)]

    def _encode(self, encode_batch, texts: Sequence[str]) -> list:
        previous = self.hf.encode_special_tokens
        self.hf.encode_special_tokens = True  # special tokens' strings are text; the setting is restored
        try:
            return encode_batch(list(texts), add_special_tokens=False)
        finally:
            self.hf.encode_special_tokens = previous

    def encode_verbatim(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def files(self) -> dict[str, bytes]:
        return {TOKENIZER_JSON: self.hf.to_str(pretty=True).encode("utf-8")}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
    """Trains a byte-level BPE on `texts` (same texts in the same order -> same tokenizer). Ids 0.. are the
    special tokens in SPECIAL_TOKENS order, so `<pad>` is 0 and padding rows are all zeros."""
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {min_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return BpeTokenizer(tokenizer)


def load_tokenizer(path: str | pathlib.Path) -> TextTokenizer:
    """The tokenizer at `path`: a tokenizer.json, a SentencePiece model (its tokenizer_config.json and
    added_tokens.json read from beside it), or a directory holding either (tokenizer.json first). The error
    names the file when it is missing, malformed or lacks BOS/EOS."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = [path / name for name in _MAIN_FILES if (path / name).is_file()]
        if not found:
            raise TokenizerError(f"{path} holds no {TOKENIZER_JSON} or {SENTENCEPIECE_MODEL}")
        path = found[0]
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist")
    tokenizer = _read_bpe(path) if path.suffix == ".json" else _read_sentencepiece(path)
    missing = [t for t in REQUIRED_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise TokenizerError(f"tokenizer file {path} lacks the special tokens {missing}")
    return tokenizer


def has_tokenizer(directory: str | pathlib.Path) -> bool:
    """Whether `directory` holds a tokenizer's main file."""
    return any((pathlib.Path(directory) / name).is_file() for name in _MAIN_FILES)


def _read_bpe(path: pathlib.Path) -> BpeTokenizer:
    try:
        return BpeTokenizer(Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"tokenizer file {path} is not a valid tokenizer.json: {e}") from None


def _read_sentencepiece(path: pathlib.Path) -> TextTokenizer:
    from data_pipelines.sentencepiece_tokenizer import read_sentencepiece  # only runs that use one need it

    return read_sentencepiece(path)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
