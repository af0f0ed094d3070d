"""SentencePiece tokenizers as OpenBMB releases them: `tokenizer.model` (BPE with byte fallback: `<unk>` 0,
`<s>` 1, `</s>` 2) and, beside it, tokenizer_config.json / added_tokens.json naming the added tokens that follow
the model's pieces (MiniCPM4: `<|im_end|>` 73440 ... `<|fim_suffix|>` 73447). Text is encoded by the
`sentencepiece` package itself, one text at a time with its dummy prefix, as transformers' LlamaTokenizer
(legacy) encodes each stretch between special tokens; added tokens are only ever inserted by id.
"""

import json
import pathlib
import re
from collections.abc import Sequence

import numpy as np
import sentencepiece

from data_pipelines.tokenizer import SENTENCEPIECE_MODEL, Encoded, TextTokenizer, TokenizerError

TOKENIZER_CONFIG, ADDED_TOKENS, SPECIAL_TOKENS_MAP = (
    "tokenizer_config.json",
    "added_tokens.json",
    "special_tokens_map.json",
)
_COMPANIONS = (TOKENIZER_CONFIG, ADDED_TOKENS, SPECIAL_TOKENS_MAP)  # kept with the model, copied as they are


class SentencePieceTokenizer(TextTokenizer):
    """A SentencePiece model plus the added tokens its HF config files name (content -> id)."""

    kind, piecewise = "sentencepiece", False

    def __init__(self, files: dict[str, bytes], added_tokens: dict[str, int], config: dict, source: str):
        self._files = files
        self.model_proto = files[SENTENCEPIECE_MODEL]
        self.processor = _processor(self.model_proto, source)
        self.added_tokens = added_tokens  # content -> id, each past the model's pieces or equal to one
        self.config = config  # tokenizer_config.json's fields (chat_template, add_bos_token, ...)
        self._added_by_id = {i: token for token, i in added_tokens.items()}
        self._special_ids = {i for i, spec in _added_specs(config).items() if spec.get("special", True)}
        controls = [
            p
            for i in range(self.processor.get_piece_size())
            if self.processor.is_control(i)
            for p in [self.processor.id_to_piece(i)]
        ]
        tokens = sorted({*added_tokens, *controls}, key=len, reverse=True)
        self._control_pattern = re.compile("(" + "|".join(map(re.escape, tokens)) + ")")

    def is_special(self, i: int) -> bool:
        """Whether added token `i` is special (a control token, left out of decoded text)."""
        return i in self._special_ids

    def token_to_id(self, token: str) -> int | None:
        if token in self.added_tokens:
            return self.added_tokens[token]
        i = self.processor.piece_to_id(token)
        return i if self.processor.id_to_piece(i) == token else None  # an unknown piece maps to <unk>

    def encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts), out_type=int) if texts else []

    def encode_with_offsets(self, texts: Sequence[str]) -> list[Encoded]:
        return [self._encode_with_offsets(t) for t in texts]

    def _encode_with_offsets(self, text: str) -> Encoded:
        """Each piece's span is its surface, the stretch of `text` it covers (SentencePiece's surfaces concatenate
        to the text; the byte-fallback pieces of one character but the last have an empty one)."""
        pieces = self.processor.encode(text, out_type="immutable_proto").pieces
        ends = np.cumsum([len(p.surface) for p in pieces], dtype=np.int64)  # [pieces]
        return Encoded(
            [p.id for p in pieces], [(int(e) - len(p.surface), int(e)) for p, e in zip(pieces, ends)]
        )

    def encode_verbatim(self, text: str) -> list[int]:
        """Added tokens and the model's control pieces (`<s>`, `</s>`) are matched in the text, longest first;
        the stretches between them are encoded as text (each with its dummy prefix, as transformers' legacy
        LlamaTokenizer does)."""
        ids = []
        for i, stretch in enumerate(self._control_pattern.split(text)):
            if i % 2:
                ids.append(self.token_to_id(stretch))
            elif stretch:
                ids += self.encode_ids(stretch)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`: runs of model pieces decoded by sentencepiece (control pieces left out), added
        tokens as their content unless they are special."""
        text, run = [], []
        for i in map(int, ids):
            if i not in self._added_by_id or i < self.processor.get_piece_size():
                run.append(i)
                continue
            text.append(self.processor.decode(run))
            run = []
            if i not in self._special_ids:
                text.append(self._added_by_id[i])
        return "".join(text + [self.processor.decode(run)])

    @property
    def vocab_size(self) -> int:
        return max([self.processor.get_piece_size() - 1, *self.added_tokens.values()]) + 1

    @property
    def files(self) -> dict[str, bytes]:
        return dict(self._files)


def read_sentencepiece(path: pathlib.Path) -> SentencePieceTokenizer:
    """The SentencePiece model at `path` with the config files beside it; TokenizerError naming the file when
    the model is not SentencePiece, a config file is malformed, or an added token contradicts a model piece."""
    files = {SENTENCEPIECE_MODEL: path.read_bytes()}
    files.update(
        {name: (path.parent / name).read_bytes() for name in _COMPANIONS if (path.parent / name).is_file()}
    )
    config = _json_file(path.parent / TOKENIZER_CONFIG, files.get(TOKENIZER_CONFIG, b"{}"))
    if config.get("add_bos_token", True) is not True:
        raise TokenizerError(
            f"{path.parent / TOKENIZER_CONFIG}: add_bos_token {config['add_bos_token']!r} is not supported "
            "(mct starts every document with <s>)"
        )
    added = _added_tokens(
        path.parent, config, _json_file(path.parent / ADDED_TOKENS, files.get(ADDED_TOKENS, b"{}"))
    )
    tokenizer = SentencePieceTokenizer(files, added, config, str(path))
    for token, i in added.items():
        piece = tokenizer.processor.id_to_piece(i) if i < tokenizer.processor.get_piece_size() else token
        if piece != token:
            raise TokenizerError(
                f"{path.parent / TOKENIZER_CONFIG}: added token {token!r} has id {i}, which {path} gives to "
                f"{piece!r}"
            )
    return tokenizer


def _processor(model_proto: bytes, source: str) -> sentencepiece.SentencePieceProcessor:
    try:
        return sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError or a protobuf error on a foreign file
        raise TokenizerError(f"tokenizer file {source} is not a SentencePiece model: {e}") from None


def _json_file(path: pathlib.Path, data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return value


def _added_specs(config: dict) -> dict[int, dict]:
    specs = config.get("added_tokens_decoder") or {}
    return {int(i): spec for i, spec in specs.items() if isinstance(spec, dict)}


def _added_tokens(directory: pathlib.Path, config: dict, added_json: dict) -> dict[str, int]:
    """content -> id from tokenizer_config.json's added_tokens_decoder and added_tokens.json; they must agree."""
    try:
        from_config = {spec["content"]: i for i, spec in _added_specs(config).items()}
    except KeyError:
        raise TokenizerError(
            f"{directory / TOKENIZER_CONFIG}: an added_tokens_decoder entry lacks 'content'"
        ) from None
    for token, i in added_json.items():
        if from_config.setdefault(token, i) != i or not isinstance(i, int):
            raise TokenizerError(
                f"{directory / ADDED_TOKENS} gives {token!r} the id {i!r}, {directory / TOKENIZER_CONFIG} "
                f"{from_config[token]}"
            )
    return from_config
