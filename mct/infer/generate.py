"""Prompts of a run's tokenizer decoded by the one decode loop: plain sampling, FR-Spec speculative decoding
with a draft run, or MTP self-speculation.

Prompts start with BOS, like training documents; EOS ends a row. A chat prompt is a user turn of the chat
format (data_pipelines.chat) and its answer ends at `<|im_end|>`. The output distribution is the same for
every strategy.
"""

import json
import sys

from data_pipelines.chat import encode_chat
from data_pipelines.tokenizer import BOS, TextTokenizer
from mct.infer.loop import Timings


class StreamPrinter:
    """Prints one row's continuation as it grows, holding back bytes that do not yet form a character."""

    def __init__(self, tokenizer: TextTokenizer, out=sys.stdout):
        self._tokenizer, self._out = tokenizer, out
        self._ids: list[int] = []
        self._printed = 0

    def __call__(self, new: list[list[int]]) -> None:
        self._ids.extend(new[0])
        text = self._tokenizer.decode(self._ids)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence decodes to U+FFFD until it completes
            self._write(text)

    def finish(self) -> None:
        """Prints what is held back (bytes that never completed a character) and ends the line."""
        self._write(self._tokenizer.decode(self._ids) + "\n")

    def _write(self, text: str) -> None:
        self._out.write(text[self._printed :])
        self._out.flush()
        self._printed = len(text)


def read_prompts_file(path: str) -> list[str]:
    """The prompts of a JSON-lines file, one {"prompt": text} a line (blank lines skipped); ValueError naming
    the file and line of a bad one."""
    prompts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompt = json.loads(line).get("prompt")
            except (json.JSONDecodeError, AttributeError):
                prompt = None
            if not isinstance(prompt, str):
                raise ValueError(f'{path}:{number}: expected a JSON object with a "prompt" string')
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def encode_prompts(tokenizer: TextTokenizer, prompts: list[str], chat: bool = False) -> list[list[int]]:
    """[BOS] + ids of each prompt, verbatim (its control strings are control tokens, as llama.cpp and
    transformers read a prompt); with `chat`, each prompt is the content of a user turn (text: it cannot forge
    a turn) followed by the assistant header."""
    if chat:
        turn = lambda p: [{"role": "user", "content": p}]
        return [encode_chat(tokenizer, turn(p), add_generation_prompt=True)[0] for p in prompts]
    bos = tokenizer.token_to_id(BOS)
    return [[bos] + tokenizer.encode_verbatim(p) for p in prompts]


def report(
    tokenizer: TextTokenizer, prompts: list[list[int]], outputs: list[list[int]], timings: Timings, slots: int
) -> dict:
    """`mct.generate --json`'s summary of a batch: each row's text and tokens, and its rates (all rows); slots:
    the rows decoded at once (continuous batching, mct.infer.engine; the batch otherwise).

    decode_tokens_per_s counts the tokens of the token loop (a row's first token comes from the prefill) over
    its time; neither rate includes compiling, which compile_s reports.
    """
    decoded = sum(max(len(tokens) - 1, 0) for tokens in outputs)
    rate = lambda n, seconds: n / seconds if seconds > 0 else None
    return {
        "texts": [tokenizer.decode(tokens) for tokens in outputs],
        "tokens": outputs,
        "decode_tokens_per_s": rate(decoded, timings.decode_s),
        "prefill_tokens_per_s": rate(sum(map(len, prompts)), timings.prefill_s),
        "compile_s": timings.compile_s,
        "batch": len(prompts),
        "slots": slots,
    }
