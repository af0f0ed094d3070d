"""The chat format of MiniCPM4 (ChatML after BOS) as text, as token ids with a loss mask, and as the jinja
template exports write, so transformers' `apply_chat_template` gives the same ids (docs/design.md, Post-training).

    <s><|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n{content}<|im_end|>\n

SFT trains on assistant content and its closing `<|im_end|>` only (MiniCPM4 report, SFT; OpenBMB's finetune
script): system and user turns and the `<|im_start|>assistant\n` header are masked. The ids come from one
encoding of the whole rendered text (what transformers does), and the mask from the tokens' character offsets.
"""

from collections.abc import Sequence

from tokenizers import Tokenizer

from data_pipelines.tokenizer import BOS

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_messages(messages: Sequence[dict]) -> None:
    """ValueError naming the first message that is not {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError(
            f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.80}")


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly what CHAT_TEMPLATE renders (bos_token = BOS)."""
    check_messages(messages)
    text = BOS + "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    i = tokenizer.token_to_id(token)
    if i is None:
        raise ValueError(f"the tokenizer has no {token} token: it cannot encode chats")
    return i


def im_end_id(tokenizer: Tokenizer) -> int:
    """The id of `<|im_end|>`, which ends every turn (decoding stops there)."""
    return _token_id(tokenizer, IM_END)


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation: mask 1 on the tokens of assistant content and its `<|im_end|>`.

    A token counts as content when it starts inside the content (a token merging the header's newline with
    leading newlines of the content stays masked: the header is never trained on)."""
    for token in (BOS, IM_START, IM_END):
        _token_id(tokenizer, token)
    text = render_chat(messages, add_generation_prompt=add_generation_prompt)
    spans = []  # [start, end) character spans of assistant content + <|im_end|>
    cursor = len(BOS)
    for m in messages:
        header = f"{IM_START}{m['role']}\n"
        start = cursor + len(header)
        end = start + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            spans.append((start, end))
        cursor = end + 1  # the newline after <|im_end|>
    encoding = tokenizer.encode(text, add_special_tokens=False)
    mask, span = [], 0
    for first, _ in encoding.offsets:
        while span < len(spans) and first >= spans[span][1]:
            span += 1
        mask.append(int(span < len(spans) and spans[span][0] <= first))
    return list(encoding.ids), mask
