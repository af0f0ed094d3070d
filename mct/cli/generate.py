"""Text generation from a training checkpoint, streaming the continuation as it is decoded.

    python -m mct.generate --workdir DIR --prompt "def main(" [--prompt "..."] [--prompts_file FILE.jsonl]
        [--max_new_tokens N --temperature T --top_p P --seed S --step N --chat --json --quant Q --slots N
        --prefill_chunk N] [--draft_workdir DIR --freq_vocab FILE --num_draft K]

Prompts are encoded with the run's tokenizer and start with BOS, like training documents; EOS ends a row.
With --chat each prompt is a user turn of the chat format (data_pipelines.chat) and the answer ends at `<|im_end|>`.
One prompt streams token by token; several (--prompt repeated, and/or --prompts_file: one {"prompt": text} a
line) are decoded by continuous batching over --slots cache rows (mct.infer.engine; prompt i samples with
seed + i) and printed when done. With --draft_workdir, a smaller model of the same tokenizer drafts tokens
(FR-Spec speculative decoding, its LM head cut to the --freq_vocab ids; a batch, not the engine); with
--speculative mtp, the model's own MTP block drafts one token per pass (mct.infer.mtp_speculative). The output
distribution is the same. --quant int8 / int4 decodes with weight-only quantised hidden matrices
(mct/model/weight_quant.py). With --json the last line is one JSON object: texts, tokens, decode and prefill
tokens/s (without compiling), compile_s, batch, slots.

Flags and wiring only: `mct.infer.generate` does the work.
"""

import functools
import json
import sys

from absl import flags, logging

from data_pipelines.chat import im_end_id
from data_pipelines.freq_vocab import read_freq_vocab
from data_pipelines.tokenizer import EOS
from mct.cli import common as cli
from mct.errors import UserError
from mct.infer.decoding import Sampling, check_quant, generate
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
        "speculative", None, ["mtp"], "mtp: the model's MTP block drafts (model.mtp.depth >= 1)."
    )
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
        decode, slots = functools.partial(generate, run.model_cfg, params), len(texts)
        if len(texts) > 1 and not (f.draft_workdir or f.speculative):  # continuous batching
            slots = min(f.slots, len(texts))
            decode = functools.partial(
                generate_many, run.model_cfg, params, slots=f.slots, prefill_chunk=f.prefill_chunk
            )
        if f.draft_workdir:
            draft = RunCheckpoint(f.draft_workdir)
            vocab = read_freq_vocab(f.freq_vocab, run.model_cfg.vocab_size) if f.freq_vocab else None
            speculative = functools.partial(
                speculative_generate,
                run.model_cfg,
                params,
                draft.model_cfg,
                draft.read_params(),
                num_draft=f.num_draft,
                draft_vocab=vocab,
            )
            decode = lambda prompts, **kwargs: speculative(prompts, **kwargs)[0]
        if f.speculative == "mtp":
            if f.draft_workdir or not run.model_cfg.mtp.depth:
                raise ValueError(
                    f"--speculative mtp needs a run with an MTP block (model.mtp.depth="
                    f"{run.model_cfg.mtp.depth}) and no --draft_workdir"
                )
            decode = lambda prompts, **kwargs: mtp_generate(run.model_cfg, params, prompts, **kwargs)[0]
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
    outputs = decode(
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
        print(json.dumps(report(tokenizer, prompts, outputs, timings, slots)))


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
