"""Text generation from a training checkpoint, streaming the continuation as it is decoded.

    python -m mct.generate --workdir DIR --prompt "def main(" [--prompt "..."] [--prompts_file FILE.jsonl]
        [--max_new_tokens N --temperature T --top_p P --seed S --step N --chat --json --quant Q --slots N
        --prefill_chunk N] [--draft_workdir DIR --freq_vocab FILE --num_draft K] [--speculative eagle
        --draft_workdir HEAD_DIR --freq_vocab FILE --num_draft K --tree_top_k K --tree_depth D --tree_total_tokens T]

Prompts are encoded with the run's tokenizer and start with BOS, like training documents; EOS ends a row.
With --chat each prompt is a user turn of the chat format (data_pipelines.chat) and the answer ends at `<|im_end|>`.
One prompt streams token by token; several (--prompt repeated, and/or --prompts_file: one {"prompt": text} a
line) are decoded by continuous batching over --slots cache rows (mct.infer.engine; prompt i samples with
seed + i) and printed when done. With --draft_workdir, a smaller model of the same tokenizer drafts tokens
(FR-Spec speculative decoding, its LM head cut to the --freq_vocab ids; a batch, not the engine); with
--speculative mtp, the model's own MTP block drafts one token per pass (mct.infer.mtp_speculative); with
--speculative eagle, the EAGLE head of --draft_workdir (trained by mct.eagle for this run) drafts a chain, or an
EAGLE-2 tree with --tree_top_k (mct.infer.eagle_tree), over the --freq_vocab subset of the head. The output
distribution is the same. --quant int8 / int4 decodes with weight-only quantised hidden matrices
(mct/model/weight_quant.py). With --json the last line is one JSON object: texts, tokens, decode and prefill
tokens/s (without compiling), compile_s, batch, slots, and with a draft accepted_length_mean (tokens committed
per target pass).

Flags and wiring only: `mct.infer.generate` does the work.
"""

import functools
import json
import sys
from collections.abc import Callable

from absl import flags, logging

from data_pipelines.chat import im_end_id
from data_pipelines.freq_vocab import read_freq_vocab
from data_pipelines.tokenizer import EOS
from mct.cli import common as cli
from mct.errors import UserError
from mct.infer.decoding import Sampling, check_quant, generate
from mct.infer.eagle_decoding import eagle_generate, read_head
from mct.infer.eagle_tree import TreeShape
from mct.infer.engine import PREFILL_CHUNK, generate_many
from mct.infer.generate import StreamPrinter, encode_prompts, read_prompts_file, report
from mct.infer.loop import Timings
from mct.infer.mtp_speculative import mtp_generate
from mct.infer.speculative import speculative_generate
from mct.run.reader import RunCheckpoint


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest committed one).")
    flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat for a batch.")
    flags.DEFINE_string("prompts_file", None, 'JSON lines of {"prompt": text}, decoded after any --prompt.')
    flags.DEFINE_integer(
        "slots", 16, "Several prompts: the cache rows decoded at once (continuous batching)."
    )
    flags.DEFINE_integer(
        "prefill_chunk", PREFILL_CHUNK, "Prompt tokens per prefill call (continuous batching)."
    )
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt at most.")
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("draft_workdir", None, "Speculative decoding: the draft model's training workdir.")
    flags.DEFINE_string("freq_vocab", None, "Speculative decoding: FR-Spec ids the draft head keeps.")
    flags.DEFINE_integer("num_draft", 4, "Speculative decoding: draft tokens per target pass.")
    flags.DEFINE_enum(
        "speculative",
        None,
        ["mtp", "eagle"],
        "mtp: the model's MTP block drafts (model.mtp.depth >= 1); eagle: the EAGLE head of --draft_workdir "
        "(a mct.eagle run) drafts --num_draft tokens, or an EAGLE-2 tree with --tree_top_k.",
    )
    flags.DEFINE_integer("tree_top_k", 0, "--speculative eagle: EAGLE-2 tree children per node (0: a chain).")
    flags.DEFINE_integer("tree_depth", 4, "--speculative eagle: the tree's depth.")
    flags.DEFINE_integer("tree_total_tokens", 16, "--speculative eagle: tree nodes verified per target pass.")
    flags.DEFINE_bool(
        "chat",
        False,
        "Each prompt is a user turn (ChatML, data_pipelines.chat); the answer stops at <|im_end|>.",
    )
    flags.DEFINE_enum(
        "quant",
        "none",
        ["none", "int8", "int4"],
        "Weight-only quantised decoding (int8 per channel, int4 per 128).",
    )
    flags.DEFINE_bool(
        "json", False, "End with one JSON line: texts, tokens, tokens/s, compile_s, batch, slots."
    )


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # keep orbax's restore chatter out of the stream
    f = flags.FLAGS
    if f.max_new_tokens < 1 or f.slots < 1 or f.prefill_chunk < 1:
        raise UserError("--max_new_tokens, --slots and --prefill_chunk must be at least 1")
    try:
        texts = f.prompt + (read_prompts_file(f.prompts_file) if f.prompts_file else [])
        if not texts:
            raise ValueError("give a --prompt or a --prompts_file")
        empty = [i for i, text in enumerate(texts) if not text]
        if empty:
            raise ValueError(f"prompt {empty[0]} is empty: give it some text")
        sampling = Sampling(f.temperature, f.top_p)  # before any checkpoint is read
        run = RunCheckpoint(f.workdir, f.step)
        tokenizer = run.tokenizer()
        params = run.read_params()
        check_quant(run.model_cfg, f.quant)
        decode = lambda prompts, **kwargs: (generate(run.model_cfg, params, prompts, **kwargs), None)
        slots = len(texts)
        if len(texts) > 1 and not (f.draft_workdir or f.speculative):  # continuous batching
            slots = min(f.slots, len(texts))
            many = functools.partial(
                generate_many, run.model_cfg, params, slots=f.slots, prefill_chunk=f.prefill_chunk
            )
            decode = lambda prompts, **kwargs: (many(prompts, **kwargs), None)
        vocab = (
            read_freq_vocab(f.freq_vocab, run.model_cfg.vocab_size, tokenizer.fingerprint)
            if f.freq_vocab
            else None
        )
        if f.speculative == "eagle":
            decode = eagle_decoder(run, params, vocab)
        elif f.draft_workdir:
            draft = RunCheckpoint(f.draft_workdir)
            decode = functools.partial(
                speculative_generate,
                run.model_cfg,
                params,
                draft.model_cfg,
                draft.read_params(),
                num_draft=f.num_draft,
                draft_vocab=vocab,
            )
        if f.speculative == "mtp":
            if f.draft_workdir or not run.model_cfg.mtp.depth:
                raise ValueError(
                    f"--speculative mtp needs a run with an MTP block (model.mtp.depth="
                    f"{run.model_cfg.mtp.depth}) and no --draft_workdir"
                )
            decode = functools.partial(mtp_generate, run.model_cfg, params)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    try:
        prompts = encode_prompts(tokenizer, texts, chat=f.chat)
        eos_id = im_end_id(tokenizer) if f.chat else tokenizer.token_to_id(EOS)
    except ValueError as e:  # a tokenizer without the chat tokens
        raise UserError(f"--chat: {e}") from None
    shown = [f"{p}\n" if f.chat else p for p in texts]  # a chat answer starts on its own line
    longest = max(len(p) for p in prompts) + f.max_new_tokens
    if longest > run.model_cfg.max_position:
        raise UserError(
            f"a prompt of {longest - f.max_new_tokens} tokens + --max_new_tokens={f.max_new_tokens} exceeds the "
            f"model's max_position={run.model_cfg.max_position}"
        )
    stream = StreamPrinter(tokenizer) if len(prompts) == 1 else None
    if stream:
        sys.stdout.write(shown[0])
    timings = Timings()
    streaming = {"on_tokens": stream} if stream else {}
    outputs, spec = decode(
        prompts,
        max_new_tokens=f.max_new_tokens,
        sampling=sampling,
        eos_id=eos_id,
        seed=f.seed,
        timings=timings,
        quant=f.quant,
        **streaming,
    )
    if stream:
        stream.finish()
    else:
        for prompt, text, tokens in zip(texts, shown, outputs):
            print(f"--- {prompt!r} ({len(tokens)} tokens)\n{text}{tokenizer.decode(tokens)}")
    if f.json:
        accepted = {"accepted_length_mean": spec.mean_accepted_length} if spec else {}
        print(json.dumps(report(tokenizer, prompts, outputs, timings, slots) | accepted))


def eagle_decoder(run: RunCheckpoint, params: dict, vocab) -> Callable:
    """decode(prompts, **kwargs) -> (outputs, stats) with the EAGLE head of --draft_workdir (checked to be a
    head for this run), a chain of --num_draft or a tree of --tree_* drafts."""
    f = flags.FLAGS
    if not f.draft_workdir:
        raise ValueError(
            "--speculative eagle needs --draft_workdir (a head trained by mct.eagle for this run)"
        )
    head = read_head(f.draft_workdir, run)
    tree = TreeShape(f.tree_top_k, f.tree_depth, f.tree_total_tokens) if f.tree_top_k else None
    return functools.partial(
        eagle_generate, run.model_cfg, params, head, num_draft=f.num_draft, tree=tree, draft_vocab=vocab
    )


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
