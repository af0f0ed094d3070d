"""llama.cpp in a process of its own, as its users run it: `python -m tests.llama_cpp_client` reads
{"model": GGUF path, "ctx": positions, "requests": [...]} as JSON on stdin and prints a JSON list with one
answer per request. tests/test_llama_cpp.py asks through `ask`; its own process (JAX, torch) never runs ggml's
OpenMP threads, and a crash in llama.cpp fails one test with its stderr instead of taking the worker down.

Requests: {"op": "logits", "ids": [...]} -> [len(ids), vocab] logits of a fresh sequence;
{"op": "greedy", "prompt": [...], "max_new": n} -> n argmax tokens through llama.cpp's KV cache (no EOS stop);
{"op": "tokenize", "text": s} -> ids with BOS and special tokens; {"op": "chat", "messages": [...]} -> the GGUF's
chat template rendered with a generation prompt; {"op": "special"} -> {"bos": id, "eos": id}; {"op": "eog"} -> the
ids llama.cpp ends generation at."""

import json
import sys

import gguf
import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from data_pipelines.tokenizer import BOS, EOS


def load(path: str, ctx: int) -> llama_cpp.Llama:
    """llama.cpp with f32 KV cache (its f16 default rounds K and V) and every position's logits kept."""
    f32 = int(gguf.GGMLQuantizationType.F32)
    return llama_cpp.Llama(
        model_path=path,
        n_ctx=ctx,
        n_batch=ctx,
        n_ubatch=ctx,
        logits_all=True,
        type_k=f32,
        type_v=f32,
        n_threads=2,
        verbose=False,
    )


def logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of a fresh sequence."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def greedy(llm: llama_cpp.Llama, prompt: list[int], max_new: int) -> list[int]:
    """Argmax decoding one token at a time through llama.cpp's KV cache (no EOS stop, as in mct's call)."""
    logits(llm, prompt)
    tokens = []
    for _ in range(max_new):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
    return tokens


def answer(llm: llama_cpp.Llama, request: dict) -> list | str | dict:
    """The JSON-able answer to one request (the module docstring lists them)."""
    op = request["op"]
    if op == "logits":
        return logits(llm, request["ids"]).tolist()
    if op == "greedy":
        return greedy(llm, request["prompt"], request["max_new"])
    if op == "tokenize":
        return llm.tokenize(request["text"].encode(), add_bos=True, special=True)
    if op == "chat":
        render = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=EOS, bos_token=BOS)
        return render(messages=request["messages"]).prompt
    if op == "special":
        return {"bos": llm.token_bos(), "eos": llm.token_eos()}
    if op == "eog":
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        return [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    raise ValueError(f"unknown op {op!r}")


def main() -> None:
    job = json.load(sys.stdin)
    llm = load(job["model"], job["ctx"])
    json.dump([answer(llm, request) for request in job["requests"]], sys.stdout)


if __name__ == "__main__":
    main()
