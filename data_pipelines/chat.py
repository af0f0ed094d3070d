"""The chat format of MiniCPM4 (ChatML after BOS) as text, as token ids with a loss mask, and as the jinja
template exports write (docs/design.md, Post-training).

    <s><|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{content}<|im_end|>\n

SFT trains on assistant content and its closing `<|im_end|>` only (MiniCPM4 report, SFT; OpenBMB's finetune
script): system and user turns and the `<|im_start|>assistant\n` header are masked.

Content is text: the control tokens (`<s>`, `<|im_start|>`, `<|im_end|>`) are inserted by id where the format
puts them, and the text between them, content included, is encoded as text (`TextTokenizer`; a control
string inside content becomes the ids of its characters, as in prepare's documents), so no message can forge a
turn. For the byte-level BPE that prepare trains, the ids equal one encoding of the rendered text whenever the
content holds no control string, so transformers' `apply_chat_template` with the exported template gives the
same ids; for content that holds one, transformers reads it as the control token and mct does not.
"""

import dataclasses
from collections.abc import Sequence

from data_pipelines.tokenizer import BOS, TextTokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """A stretch of the rendered conversation: a control token (inserted by id) or text (encoded as text).
    SFT trains on its tokens that start at or after character `trained_from` (None: on none of them)."""

    text: str
    control: bool
    trained_from: int | None = None


def check_messages(messages: Sequence[dict]) -> None:
    """ValueError naming the first message that is not {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}")


def _pieces(messages: Sequence[dict], add_generation_prompt: bool) -> list[_Piece]:
    """The conversation in the format's order; an assistant turn trains on its content and `<|im_end|>`."""
    check_messages(messages)
    pieces = [_Piece(BOS, True)]
    for m in messages:
        header, trained = f"{m['role']}\n", m["role"] == "assistant"
        pieces += [
            _Piece(IM_START, True),
            _Piece(header + m["content"], False, len(header) if trained else None),
            _Piece(IM_END, True, 0 if trained else None),
            _Piece("\n", False),
        ]
    if add_generation_prompt:
        pieces += [_Piece(IM_START, True), _Piece("assistant\n", False)]
    return pieces


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly what CHAT_TEMPLATE renders (bos_token = BOS)."""
    return "".join(p.text for p in _pieces(messages, add_generation_prompt))


def _token_id(tokenizer: TextTokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token} token: it cannot encode chats")
    return i


def im_end_id(tokenizer: TextTokenizer) -> int:
    """The id of `<|im_end|>`, which ends every turn (decoding stops there)."""
    return _token_id(tokenizer, IM_END)


def encode_chat(
    tokenizer: TextTokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation: mask 1 on the tokens of assistant content and its `<|im_end|>`.

    A token counts as content when it starts inside the content (a token merging the header's newline with
    leading newlines of the content stays masked: the header is never trained on)."""
    control = {token: _token_id(tokenizer, token) for token in (BOS, IM_START, IM_END)}
    pieces = _pieces(messages, add_generation_prompt)
    texts = iter(tokenizer.encode_with_offsets([p.text for p in pieces if not p.control]))
    ids, mask = [], []
    for p in pieces:
        if p.control:
            ids.append(control[p.text])
            mask.append(int(p.trained_from is not None))
            continue
        encoding = next(texts)
        ids += encoding.ids
        mask += [int(p.trained_from is not None and first >= p.trained_from) for first, _ in encoding.offsets]
    return ids, mask
