"""Byte-level BPE tokenizer: deterministic training with HF `tokenizers` and the special tokens we rely on.

Ids 0.. are the special tokens in SPECIAL_TOKENS order, so `<pad>` is 0 and padding rows are all zeros.
"""

import hashlib
import pathlib
from collections.abc import Iterable

from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS, "<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>")
REQUIRED_TOKENS = (BOS, EOS)  # prepare wraps every document as [BOS] + ids + [EOS]


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE on `texts` (same texts in the same order -> same tokenizer)."""
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
    return tokenizer


def read_tokenizer_file(path: str | pathlib.Path) -> Tokenizer:
    """Loads a tokenizer.json; the error names the file when it is missing, malformed or lacks BOS/EOS."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"tokenizer file {path} is not a valid tokenizer.json: {e}") from None
    missing = [t for t in REQUIRED_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer file {path} lacks the special tokens {missing}")
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of those SPECIAL_TOKENS that the tokenizer has."""
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    return {token: i for token, i in ids.items() if i is not None}


def encode_texts(tokenizer: Tokenizer, texts: Iterable[str]) -> list[Encoding]:
    """The encodings of `texts` as plain text, nothing added: a special token's string inside a text (`<s>`,
    `<|im_end|>`) is encoded as its characters, never as that control token, so no text can forge a document
    boundary or a chat turn. This is the rule for every text mct encodes (prepare's documents, chat content,
    prompts): control tokens are inserted by id. (HF tokenizers' `encode_special_tokens`, transformers'
    `split_special_tokens`, tiktoken's `allowed_special=()`; the tokenizer's own setting is restored.)
    """
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    finally:
        tokenizer.encode_special_tokens = previous


def tokenizer_bytes(tokenizer: Tokenizer) -> bytes:
    """The canonical tokenizer.json bytes (what prepare writes and the manifest hashes)."""
    return tokenizer.to_str(pretty=True).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
