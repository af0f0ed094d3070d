"""The tokenizer half of a GGUF file: every `tokenizer.*` key llama.cpp's vocabulary loader reads, from one of the
two tokenizers mct knows.

- mct's byte-level BPE tokenizer.json (data_pipelines.tokenizer) becomes llama.cpp's `gpt2` model with GPT-2's
  split (`gpt-2` pre-tokenizer); its special tokens are control tokens.
- A SentencePiece model (MiniCPM4's tokenizer.model: BPE with byte fallback) plus the Hugging Face added tokens
  after it becomes llama.cpp's `llama` model: pieces with their scores, and each token typed as llama.cpp's own
  converter types it (convert_hf_to_gguf.py's SentencePiece vocabulary): SentencePiece's unknown / control /
  unused / byte pieces keep their kind, the other pieces are normal; an added token (tokenizer_config.json's
  `added_tokens_decoder`, which may also name pieces, as `<unk>`, `<s>`, `</s>` in the releases) is a control
  token when marked special or when it looks special (`<|...|>` and a few names), else user-defined, with score
  -1000; ids past the tokenizer up to the model's vocab_size are unused `[PAD<id>]` with score -10000. GGUF has
  one eos id: `</s>`, and `<|im_end|>` (the releases' second eos id, which ends every chat turn) is the
  end-of-turn token, which llama.cpp also stops generation at.

Both add BOS (mct encodes every prompt as [BOS] + ids) and no EOS. llama.cpp's `llama` model applies no
normalizer: it prefixes a space when the model's `add_dummy_prefix` does and writes spaces as U+2581, so a
SentencePiece model whose normalizer does more (NFKC, collapsing whitespace) is refused rather than tokenized
differently.
"""

import dataclasses
import json
from collections.abc import Mapping
from typing import NamedTuple

import sentencepiece
from tokenizers import Tokenizer

from data_pipelines.chat import CHAT_TEMPLATE
from data_pipelines.extras import import_extra
from data_pipelines.sentencepiece_tokenizer import SentencePieceTokenizer
from data_pipelines.tokenizer import BOS, EOS, PAD, BpeTokenizer

gguf = import_extra("gguf", "gguf")  # llama.cpp's own writer (the `gguf` extra)

SPACE = "\u2581"  # SentencePiece's visible space
ADDED_SCORE, PAD_SCORE = -1000.0, -10000.0  # llama.cpp's converter's scores for added tokens and pads
END_OF_TURN = "<|im_end|>"
# llama.cpp's converter treats these added tokens as control tokens even when not marked special
SPECIAL_LOOKING = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
SPECIAL_LOOKING_BRACKETS = (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">"))
# text whose SentencePiece normalization must be llama.cpp's (only spaces escaped, dummy prefix)
NORMALIZER_PROBE = "a  b\t\n \u3000\uff46\ufb01\u2460 \u00e9e\u0301 \u65e5\U0001f600 "


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Every tokenizer value one GGUF file holds; None: the key is not written."""

    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    special_ids: dict[str, int]  # "bos" / "eos" / "eot" / "unk" / "pad" -> id
    chat_template: str | list[dict[str, str]]  # one template, or named ones as tokenizer_config.json has them
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] | None = None  # byte-level BPE only
    add_space_prefix: bool | None = None  # SentencePiece only


class AddedToken(NamedTuple):
    """One entry of tokenizer_config.json's added_tokens_decoder: its text and whether it is special."""

    content: str
    special: bool


def byte_level_bpe_vocab(tokenizer: Tokenizer, vocab_size: int) -> Vocab:
    """llama.cpp's gpt2 vocabulary of mct's tokenizer; ids past the tokenizer's are unused pads.

    Only byte-level BPE with GPT-2's split (data_pipelines.tokenizer) maps onto llama.cpp exactly: others fail.
    """
    spec = json.loads(tokenizer.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if (
        model.get("type") != "BPE"
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space")
        or spec.get("normalizer")
    ):
        raise ValueError(
            "GGUF export needs a byte-level BPE tokenizer with GPT-2's split (pre_tokenizer ByteLevel, no prefix "
            f"space, no normalizer), as data_pipelines.tokenizer trains; this one has model {model.get('type')!r}, "
            f"pre_tokenizer {pre.get('type')!r}"
        )
    added = {t["content"]: t["special"] for t in spec.get("added_tokens", [])}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        tokens[i] = token
        kind = gguf.TokenType.CONTROL if added.get(token) else gguf.TokenType.NORMAL
        types[i] = int(gguf.TokenType.USER_DEFINED if added.get(token) is False else kind)
    special = {"bos": BOS, "eos": EOS, "pad": PAD}
    return Vocab(
        model="gpt2",
        pre="gpt-2",  # GPT-2's split regex, which HF's ByteLevel(use_regex=True) applies
        tokens=tokens,
        types=types,
        special_ids={
            k: tokenizer.token_to_id(t) for k, t in special.items() if tokenizer.token_to_id(t) is not None
        },
        chat_template=CHAT_TEMPLATE,
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
    )


def looks_special(content: str) -> bool:
    """Whether llama.cpp's converter makes an added token a control token even when it is not marked special."""
    return content in SPECIAL_LOOKING or any(
        content.startswith(a) and content.endswith(b) for a, b in SPECIAL_LOOKING_BRACKETS
    )


def piece_type(sp: sentencepiece.SentencePieceProcessor, i: int) -> gguf.TokenType:
    """The GGUF type of SentencePiece piece i (its own kind; normal for an ordinary piece)."""
    for is_kind, kind in (
        (sp.is_unknown, gguf.TokenType.UNKNOWN),
        (sp.is_control, gguf.TokenType.CONTROL),
        (sp.is_unused, gguf.TokenType.UNUSED),
        (sp.is_byte, gguf.TokenType.BYTE),
    ):
        if is_kind(i):
            return kind
    return gguf.TokenType.NORMAL


def space_prefix(sp: sentencepiece.SentencePieceProcessor) -> bool:
    """Whether the model adds a dummy space prefix; ValueError when its normalizer does anything llama.cpp's
    `llama` tokenizer does not (which only escapes spaces), checked on a probe of whitespace runs, compatibility
    and combining characters."""
    normalized = sp.normalize(NORMALIZER_PROBE)
    prefix = normalized.startswith(SPACE)  # the probe starts with a letter: a leading U+2581 is the prefix
    if normalized != SPACE * prefix + NORMALIZER_PROBE.replace(" ", SPACE):
        raise ValueError(
            "GGUF export needs a SentencePiece model without a normalizer (normalization_rule_name identity, "
            "remove_extra_whitespaces false): llama.cpp would tokenize this one's text differently"
        )
    return prefix


def sentencepiece_vocab(
    model_proto: bytes,
    added_tokens: Mapping[int, AddedToken],
    vocab_size: int,
    chat_template: str | list[dict[str, str]] = CHAT_TEMPLATE,
) -> Vocab:
    """llama.cpp's `llama` vocabulary of a SentencePiece model (its serialized ModelProto) with `added_tokens`
    (id -> token) over it, padded to the model's vocab_size (the module docstring gives the rules)."""
    sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    n = sp.get_piece_size()
    if (last := max([n - 1, *added_tokens])) >= vocab_size:
        raise ValueError(f"the tokenizer has ids up to {last}, past the model's vocab_size {vocab_size}")
    tokens = [sp.id_to_piece(i) for i in range(n)] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    scores = [sp.get_score(i) for i in range(n)] + [PAD_SCORE] * (vocab_size - n)
    types = [int(piece_type(sp, i)) for i in range(n)] + [int(gguf.TokenType.UNUSED)] * (vocab_size - n)
    for i, token in added_tokens.items():
        control = token.special or looks_special(token.content)
        tokens[i] = token.content if control else token.content.replace(SPACE, " ")
        types[i] = int(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        scores[i] = ADDED_SCORE
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    eot = [i for i, token in added_tokens.items() if token.content == END_OF_TURN]
    return Vocab(
        model="llama",
        pre="default",
        tokens=tokens,
        types=types,
        special_ids={k: i for k, i in special.items() if i >= 0} | ({"eot": eot[0]} if eot else {}),
        chat_template=chat_template,
        scores=scores,
        add_space_prefix=space_prefix(sp),
    )


def tokenizer_vocab(tokenizer: BpeTokenizer | SentencePieceTokenizer, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a byte-level BPE tokenizer.json or of a SentencePiece tokenizer (with its added
    tokens and its chat template, data_pipelines.chat's when it has none)."""
    if isinstance(tokenizer, BpeTokenizer):
        return byte_level_bpe_vocab(tokenizer.hf, vocab_size)
    added = {i: AddedToken(token, tokenizer.is_special(i)) for token, i in tokenizer.added_tokens.items()}
    template = tokenizer.config.get("chat_template") or CHAT_TEMPLATE
    return sentencepiece_vocab(tokenizer.model_proto, added, vocab_size, template)


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Writes every tokenizer key of `vocab`, with add_bos true and add_eos false."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    add_id = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "eot": writer.add_eot_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for name, i in vocab.special_ids.items():
        add_id[name](i)
    writer.add_add_bos_token(True)  # mct.generate.encode_prompts: [BOS] + ids
    writer.add_add_eos_token(False)
    writer.add_chat_template(vocab.chat_template)
