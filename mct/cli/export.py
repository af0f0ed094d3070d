"""Exports a training checkpoint as a Hugging Face model directory (safetensors + config + tokenizer).

    python -m mct.export --workdir DIR [--step N] --format minicpm|llama|ternary --out OUT [--freq_vocab FILE]
    python -m mct.export --workdir DIR [--step N] --format gguf --gguf_type f16 --out FILE.gguf  (gguf_export)

--format minicpm writes OpenBMB's release format (docs/design.md). Llama and GGUF have no InfLLM v2: a sparse
run exports to them only with --allow_dense.

Tensors stream one at a time (one layer of one parameter, read through tensorstore) into safetensors shards
of at most --max_shard_mb, so no process ever holds more than one shard. Everything is written into a
temporary sibling of OUT and renamed at the end: a failed export leaves nothing behind.

Flags and wiring only: `mct.export.hf_export` does the work.
"""

from absl import flags
from safetensors import SafetensorError

from data_pipelines.extras import import_extra
from mct.cli import common as cli
from mct.errors import UserError
from mct.export.hf_export import DTYPES, FORMATS, GGUF, export, read_run


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest committed one).")
    flags.DEFINE_enum(
        "format",
        "minicpm",
        FORMATS,
        "minicpm, llama (muP folded in), or ternary (a QAT run's "
        "2-bit codes + per-group scales in the minicpm layout).",
    )
    flags.DEFINE_string(
        "out", None, "New (or empty) output directory; a new .gguf file for --format gguf.", required=True
    )
    flags.DEFINE_enum("dtype", "float32", sorted(DTYPES), "Tensor dtype in the safetensors files.")
    flags.DEFINE_integer("max_shard_mb", 2048, "Largest safetensors shard, in MiB.")
    flags.DEFINE_string(
        "tokenizer",
        None,
        "tokenizer.json, tokenizer.model or a directory holding one (default: the run's own).",
    )
    flags.DEFINE_bool(
        "keep_mtp",
        False,
        "Keep the MTP blocks (model.mtp.depth > 0; dropped by default), for self-speculative decoding.",
    )
    flags.DEFINE_bool(
        "allow_dense",
        False,
        "--format llama|gguf of an InfLLM v2 run: export it anyway, to run densely (a different model past "
        "model.sparse.dense_len tokens).",
    )
    flags.DEFINE_string("freq_vocab", None, "FR-Spec vocabulary file to include (data_pipelines.freq_vocab).")
    flags.DEFINE_string(
        "gguf_type",
        "f16",
        "--format gguf: the tensor type, f32, f16, q8_0, q4_k_m (through llama.cpp's quantizer) or tq2_0 (ternary "
        "QAT runs).",
    )


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    try:
        if f.format == GGUF:  # the `gguf` extra: imported only here
            gguf_export = import_extra("mct.export.gguf_export", "gguf")
            out = gguf_export.export_gguf(
                *read_run(f.workdir, f.step, f.tokenizer), f.out, f.gguf_type, f.allow_dense
            )
            print(f"exported {f.gguf_type} GGUF to {out}")
            return
        out = export(
            f.workdir,
            f.out,
            f.format,
            step=f.step,
            dtype=f.dtype,
            max_shard_bytes=f.max_shard_mb << 20,
            tokenizer_path=f.tokenizer,
            freq_vocab=f.freq_vocab,
            keep_mtp=f.keep_mtp,
            allow_dense=f.allow_dense,
        )
    except (OSError, ValueError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        raise UserError(str(e).splitlines()[0]) from None
    print(f"exported the {f.format} layout to {out}")


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
