"""A run's checkpoint as a Hugging Face model directory (safetensors + config + tokenizer), in the MiniCPM or
Llama layout or BitCPM's ternary one; GGUF through `gguf_export`.

Tensors stream one at a time (one layer of one parameter, read through tensorstore) into safetensors shards
of at most `max_shard_bytes`, so no process ever holds more than one shard. Everything is written into a
temporary sibling of the output and renamed at the end: a failed export leaves nothing behind.
"""

import json
import pathlib
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, processors
from tqdm import tqdm

from data_pipelines.chat import CHAT_TEMPLATE, IM_END, IM_START
from data_pipelines.freq_vocab import read_freq_vocab
from data_pipelines.output_dirs import fresh_directory
from data_pipelines.sentencepiece_tokenizer import TOKENIZER_CONFIG, SentencePieceTokenizer
from data_pipelines.tokenizer import BOS, EOS, PAD, BpeTokenizer, TextTokenizer, load_tokenizer
from mct.export import hf_layout
from mct.model import quant
from mct.run.reader import RunCheckpoint

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


INDEX_FILE = "model.safetensors.index.json"


FREQ_VOCAB_FILE = "freq_vocab.json"


TERNARY = "ternary"  # the MiniCPM layout with BitCPM's 2-bit codes + per-group scales (mct.model.quant)


GGUF = "gguf"  # one llama.cpp file (mct.export.gguf_export)


FORMATS = (*hf_layout.LAYOUTS, TERNARY, GGUF)


def shard_plan(plan: list[hf_layout.TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list]:
    """Tensors grouped in order into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards, size = [[]], 0
    for spec in plan:
        nbytes = int(np.prod(spec.shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def shard_file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


def write_json(path: pathlib.Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tensors(
    run: RunCheckpoint,
    layout: str,
    out: pathlib.Path,
    dtype: np.dtype,
    max_shard_bytes: int,
    ternary: bool = False,
    keep_mtp: bool = False,
):
    """Writes the safetensors shards (and their index when there are several) into `out`.

    A QAT run's hidden matrices are written as its forward uses them: dequantised (codes x scales), or with
    `ternary` as packed codes and scales (mct.model.quant.hf_ternary_tensors)."""
    cfg = run.model_cfg
    plan = hf_layout.tensor_plan(run.model_cfg, layout, keep_mtp)
    shards = shard_plan(plan, dtype.itemsize, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map, total = {}, 0
    with tqdm(total=len(plan), desc="export", unit="tensor") as bar:
        for specs, name in zip(shards, names):
            tensors = {}
            # parameter by parameter, so each is restored once per shard (the file's order is safetensors')
            for spec in sorted(specs, key=lambda s: (s.param, -1 if s.layer is None else s.layer)):
                value = run.read(spec.param, () if spec.layer is None else spec.layer)
                if ternary and spec.param in quant.QUANTISED:
                    written = quant.hf_ternary_tensors(spec.name, spec.param, value, cfg.quant.group_size)
                else:
                    value = quant.quantise_weights(cfg.quant, {spec.param: value})[spec.param]
                    written = {spec.name: hf_layout.to_hf(spec, value, dtype)}
                tensors.update(written)
                total += sum(t.nbytes for t in written.values())
                weight_map.update(dict.fromkeys(written, name))
                bar.update(1)
            save_file(tensors, str(out / name), metadata={"format": "pt"})
    if len(shards) > 1:
        write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def with_bos(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` whose encode(text) is [BOS] + ids, as mct encodes every prompt
    (mct.generate.encode_prompts); pairs as transformers' update_post_processor writes them."""
    copy = Tokenizer.from_str(tokenizer.to_str())
    copy.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0",
        pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))],
    )
    return copy


def write_tokenizer(tokenizer: TextTokenizer, out: pathlib.Path, max_length: int) -> dict[str, int]:
    """The tokenizer's files in the form transformers loads; returns the special ids. A SentencePiece tokenizer
    (a release's) is copied as it came, with a tokenizer_config.json when it had none."""
    if isinstance(tokenizer, BpeTokenizer):
        return write_bpe_tokenizer(tokenizer, out, max_length)
    tokenizer.save(out)
    ids = tokenizer.special_token_ids()
    if TOKENIZER_CONFIG not in tokenizer.files:
        write_json(out / TOKENIZER_CONFIG, sentencepiece_tokenizer_config(tokenizer, ids, max_length))
    return ids


def sentencepiece_tokenizer_config(
    tokenizer: SentencePieceTokenizer, ids: dict[str, int], max_length: int
) -> dict:
    """What a LlamaTokenizer (legacy, BOS added) reads beside a tokenizer.model: the added tokens past its
    pieces, the special tokens, the chat format."""
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t, i in sorted(tokenizer.added_tokens.items(), key=lambda item: item[1])
    }
    chat = {"chat_template": CHAT_TEMPLATE} if {IM_START, IM_END} <= ids.keys() else {}
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        **chat,
    }


def write_bpe_tokenizer(tokenizer: BpeTokenizer, out: pathlib.Path, max_length: int) -> dict[str, int]:
    """tokenizer.json plus the configs a PreTrainedTokenizerFast loads with it; returns the special ids.

    Encoding text prepends BOS, as mct does: the tokenizer.json post-processor does it (all transformers 5
    reads: it drops add_bos_token/add_eos_token when a tokenizer.json exists), and the add_bos_token /
    add_eos_token flags say the same to readers of tokenizer_config.json (e.g. llama.cpp's GGUF converter).
    """
    BpeTokenizer(with_bos(tokenizer.hf)).save(out)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    ids = tokenizer.special_token_ids()
    special = {role: token for role, token in special.items() if token in ids}
    write_json(out / "special_tokens_map.json", special)
    chat = (
        {"chat_template": CHAT_TEMPLATE} if {IM_START, IM_END} <= ids.keys() else {}
    )  # data_pipelines.chat's format
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": True,
            "add_eos_token": False,
            **special,
            **chat,
        },
    )
    return ids


def stop_ids(ids: dict[str, int]) -> list[int]:
    """The ids a generation ends at: EOS, and <|im_end|> where the tokenizer has the chat format (a chat turn
    ends there; mct.generate --chat stops there too, and OpenBMB's releases list both)."""
    return [ids[token] for token in (EOS, IM_END) if token in ids]


def read_run(
    workdir: str, step: int | None, tokenizer_path: str | None
) -> tuple[RunCheckpoint, TextTokenizer]:
    """WORKDIR's checkpoint (latest unless `step`) and its tokenizer (the run's own unless tokenizer_path),
    which must fit the model's vocabulary."""
    run = RunCheckpoint(workdir, step)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else run.tokenizer()
    if tokenizer.vocab_size > run.model_cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size "
            f"{run.model_cfg.vocab_size}"
        )
    return run, tokenizer


def export(
    workdir: str,
    out: str,
    layout: str,
    *,
    step: int | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = 2 << 30,
    tokenizer_path: str | None = None,
    freq_vocab: str | None = None,
    keep_mtp: bool = False,
    allow_dense: bool = False,
) -> pathlib.Path:
    """Exports WORKDIR's checkpoint (latest unless `step`) in `layout` (or TERNARY) to the new directory `out`;
    an InfLLM v2 run in the llama layout (which runs it densely) only with allow_dense."""
    ternary, layout = layout == TERNARY, "minicpm" if layout == TERNARY else layout
    hf_layout.check_layout(layout)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    run, tokenizer = read_run(workdir, step, tokenizer_path)
    cfg = run.model_cfg
    if layout == "llama":
        hf_layout.check_dense_export(cfg, layout, allow_dense)
    if ternary and cfg.quant.weights != "ternary":
        raise ValueError(
            f"{workdir} is not a ternary QAT run (model.quant.weights={cfg.quant.weights!r}); train with "
            "--config.model.quant.weights=ternary, or export --format minicpm|llama"
        )
    if freq_vocab:
        read_freq_vocab(freq_vocab, cfg.vocab_size)  # refuse a malformed or mismatched file before writing
    with fresh_directory(out) as tmp:
        write_tensors(
            run, layout, tmp, DTYPES[dtype], max_shard_bytes, ternary, keep_mtp and cfg.mtp.depth > 0
        )
        ids = write_tokenizer(tokenizer, tmp, cfg.max_position)
        config = hf_layout.hf_config(cfg, layout, ids, dtype)
        if keep_mtp and cfg.mtp.depth:
            config["num_nextn_predict_layers"] = cfg.mtp.depth  # DeepSeek-V3's name for the MTP depth
        if ternary:
            config["quantization_config"] = quant.ternary_config(cfg.quant)
        stops = stop_ids(ids)
        if layout == "minicpm" and len(stops) > 1:  # the release format lists both: [</s>, <|im_end|>]
            config["eos_token_id"] = stops
        write_json(tmp / "config.json", config)
        generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
        write_json(
            tmp / "generation_config.json", {**generation, "eos_token_id": stops or config["eos_token_id"]}
        )
        if freq_vocab:
            shutil.copyfile(freq_vocab, tmp / FREQ_VOCAB_FILE)
    return pathlib.Path(out)
