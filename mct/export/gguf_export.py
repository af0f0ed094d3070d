"""GGUF export for llama.cpp's `minicpm` architecture: one .gguf file that llama.cpp (and its bindings) runs.

    python -m mct.export --workdir DIR --format gguf --gguf_type f32|f16|q8_0|q4_k_m|tq2_0 --out FILE.gguf

What llama.cpp's minicpm loader reads (src/models/minicpm.cpp, the granite graph it shares), and what mct
writes there (MiniCPM paper section 4; docs/design.md "Model"):
- `minicpm.embedding_scale` = scale_emb, `minicpm.residual_scale` = scale_depth / sqrt(L) (both branches), and
  `minicpm.logit_scale` = m = d_model / dim_model_base (llama.cpp divides the logits by it).
- GQA (`attention.head_count_kv`), head_dim as `attention.key_length` / `value_length` / `rope.dimension_count`,
  rms eps, theta. llama.cpp's minicpm RoPE rotates adjacent pairs (2i, 2i+1) where mct (and HF) rotate
  (i, i + head_dim/2), so q and k rows are permuted per head to put i + head_dim/2 next to i.
- LongRoPE: `rope.scaling.type=longrope`, the original length, the cos/sin magnitude as `rope.scaling.attn_factor`,
  and the `rope_factors_long` / `rope_factors_short` tensors; llama.cpp takes the long factors when its context
  exceeds the original length, as mct takes them when its sequence (its decoding cache) does. linear and llama3
  RoPE become a `rope_freqs` tensor (each frequency's divisor). The head is tied unless `output.weight` exists.
- The tokenizer (gguf_vocab): mct's byte-level BPE as llama.cpp's `gpt2` vocabulary, or a SentencePiece
  tokenizer.model (MiniCPM4's) as its `llama` vocabulary; BOS added as mct encodes prompts, and the chat template.

Types: f32, f16; q8_0 (gguf's NumPy quantiser); q4_k_m through llama.cpp's own quantizer (llama-cpp-python;
an f16 file is written first and quantized); tq2_0 for BitCPM QAT runs: the QAT forward's ternary codes with
one f16 scale per block of 256 consecutive inputs, so model.quant.group_size must be a multiple of 256 (each
block inside one group). Embeddings and the head stay f16 in tq2_0 (BitCPM keeps them high precision), norms
and RoPE factors f32 in every type. A QAT run in the other types holds its dequantised (forward) weights.
llama.cpp attends densely, so an InfLLM v2 run is refused unless allow_dense (--allow_dense) accepts it as the dense
model it is below its dense_len; MoE runs are refused.

Tensors stream one parameter at a time (mct.run.reader), so host memory holds one stacked parameter; the file is
written under a temporary name beside FILE.gguf and renamed at the end, so a failed export leaves nothing.
"""

import ctypes
import dataclasses
import os
import pathlib

import numpy as np
from tqdm import tqdm

from data_pipelines.extras import import_extra
from data_pipelines.output_dirs import fresh_file, temporary_file_beside
from data_pipelines.tokenizer import TextTokenizer
from mct.config.model import ModelConfig
from mct.errors import ConfigError
from mct.export import gguf_vocab, hf_layout
from mct.model import quant
from mct.model.decoder import width_multiplier
from mct.model.rope import rope_tables
from mct.run.reader import RunCheckpoint

gguf = import_extra("gguf", "gguf")  # llama.cpp's own writer (the `gguf` extra)

ARCH = gguf.MODEL_ARCH.MINICPM
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]
Q = gguf.GGMLQuantizationType
TERNARY_BLOCK = gguf.QK_K  # TQ2_0: 256 weights of a row share one f16 scale
# mct parameter -> llama.cpp tensor (the lm_head row is the untied head)
TENSORS = {
    "embed": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "attn_norm": gguf.MODEL_TENSOR.ATTN_NORM,
    "wq": gguf.MODEL_TENSOR.ATTN_Q,
    "wk": gguf.MODEL_TENSOR.ATTN_K,
    "wv": gguf.MODEL_TENSOR.ATTN_V,
    "wo": gguf.MODEL_TENSOR.ATTN_OUT,
    "mlp_norm": gguf.MODEL_TENSOR.FFN_NORM,
    "w_gate": gguf.MODEL_TENSOR.FFN_GATE,
    "w_up": gguf.MODEL_TENSOR.FFN_UP,
    "w_down": gguf.MODEL_TENSOR.FFN_DOWN,
    "final_norm": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": gguf.MODEL_TENSOR.OUTPUT,
}


@dataclasses.dataclass(frozen=True)
class GGUFType:
    """How one --gguf_type stores the hidden matrices and the embedding / head (vectors are always F32)."""

    matrix: Q
    embedding: Q
    file_type: gguf.LlamaFileType
    llama_cpp_ftype: int | None = None  # written as `matrix`, then quantized to this by llama.cpp


GGUF_TYPES = {
    "f32": GGUFType(Q.F32, Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": GGUFType(Q.F16, Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": GGUFType(Q.Q8_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_k_m": GGUFType(Q.F16, Q.F16, gguf.LlamaFileType.MOSTLY_F16, int(gguf.LlamaFileType.MOSTLY_Q4_K_M)),
    "tq2_0": GGUFType(Q.TQ2_0, Q.F16, gguf.LlamaFileType.MOSTLY_TQ2_0),
}


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its name, row-major shape ([out, in] for matrices) and type; `spec` is the mct source
    (None for the RoPE factor tensors, whose values are `value`)."""

    name: str
    shape: tuple[int, ...]
    qtype: Q
    spec: hf_layout.TensorSpec | None = None
    value: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))


def check_gguf_type(gguf_type: str, cfg: ModelConfig) -> GGUFType:
    """The type's storage plan; ValueError for an unknown type or a model llama.cpp's minicpm cannot hold."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown gguf_type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    if cfg.moe.num_experts:
        raise ValueError("GGUF export supports dense MLPs only (model.moe.num_experts must be 0)")
    if gguf_type == "tq2_0":
        if cfg.quant.weights != "ternary":
            raise ValueError(
                f"gguf_type tq2_0 needs a ternary QAT run (model.quant.weights={cfg.quant.weights!r}); "
                "export a dense run as f16, q8_0 or q4_k_m"
            )
        if cfg.quant.group_size % TERNARY_BLOCK:
            raise ValueError(
                f"gguf_type tq2_0 stores one scale per {TERNARY_BLOCK} inputs, so model.quant.group_size must be "
                f"a multiple of {TERNARY_BLOCK} (this run's is {cfg.quant.group_size}); train QAT with "
                f"--config.model.quant.group_size={TERNARY_BLOCK}"
            )
    return GGUF_TYPES[gguf_type]


GGUF_ROPE_TYPES = ("default", "linear", "llama3", "longrope")  # exactly what llama.cpp computes from the file


def rope_tensors(cfg: ModelConfig) -> dict[gguf.MODEL_TENSOR, np.ndarray]:
    """The RoPE factor tensors [head_dim / 2] (llama.cpp divides each frequency by its factor)."""
    rope, half = cfg.rope, cfg.head_dim // 2
    if rope.type == "longrope":
        ones = (1.0,) * half
        return {
            gguf.MODEL_TENSOR.ROPE_FACTORS_LONG: np.asarray(rope.long_factor or ones, np.float32),
            gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT: np.asarray(rope.short_factor or ones, np.float32),
        }
    if rope.type in ("linear", "llama3"):
        base, _ = rope_tables(dataclasses.replace(rope, type="default"), cfg.head_dim, 1, cfg.max_position)
        scaled, _ = rope_tables(rope, cfg.head_dim, 1, cfg.max_position)
        return {gguf.MODEL_TENSOR.ROPE_FREQS: np.asarray(base / scaled, np.float32)}
    return {}


def tensor_plan(cfg: ModelConfig, kind: GGUFType) -> list[PlannedTensor]:
    """Every tensor of the file, ordered by (parameter, layer) so each stacked parameter is restored once."""
    plan = [
        PlannedTensor(gguf.TENSOR_NAMES[t] + ".weight", v.shape, Q.F32, value=v)
        for t, v in rope_tensors(cfg).items()
    ]
    specs = sorted(
        hf_layout.tensor_plan(cfg, "minicpm"), key=lambda s: (s.param, -1 if s.layer is None else s.layer)
    )
    for spec in specs:
        param = "lm_head" if spec.name == "lm_head.weight" else spec.param
        name = gguf.TENSOR_NAMES[TENSORS[param]].format(bid=spec.layer) + ".weight"
        if len(spec.shape) == 1:
            qtype = Q.F32
        else:
            qtype = kind.matrix if param in quant.QUANTISED else kind.embedding
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if spec.shape[-1] % block:  # a row that the type's blocks do not tile (q8_0: 32) stays F16
                qtype = Q.F16
        plan.append(PlannedTensor(name, spec.shape, qtype, spec))
    return plan


def rotate_half_to_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection [heads * head_dim, in], reordered per head from mct's RoPE pairs (i, i + half)
    to llama.cpp's adjacent pairs: new row 2i = row i, new row 2i + 1 = row i + half."""
    out, d = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, d).swapaxes(1, 2).reshape(out, d)


def tensor_data(cfg: ModelConfig, planned: PlannedTensor, value: np.ndarray) -> np.ndarray:
    """The bytes (as an array) of one planned tensor from its mct parameter (one layer of it)."""
    spec = planned.spec
    if spec.param in quant.QUANTISED:  # a QAT run's forward weights (unchanged for a dense run)
        value = quant.quantise_weights(cfg.quant, {spec.param: value})[spec.param]
    w = hf_layout.to_hf(spec, value, np.dtype(np.float32))  # [out, in] or [d]
    if spec.param in ("wq", "wk"):
        w = rotate_half_to_pairs(w, cfg.n_heads if spec.param == "wq" else cfg.n_kv_heads)
    if planned.qtype == Q.F32:
        return w
    if planned.qtype == Q.F16:
        return w.astype(np.float16)
    # TQ2_0 of the dequantised weights: every 256-block holds {-s, 0, s} of one group, so gguf's quantiser
    # (scale = the block's max |w| = s) recovers the QAT codes exactly; s is stored in f16.
    return gguf.quants.quantize(w, planned.qtype)


def write_metadata(
    writer: gguf.GGUFWriter, cfg: ModelConfig, vocab: gguf_vocab.Vocab, kind: GGUFType, name: str
):
    """Every key llama.cpp's minicpm loader and its vocabulary read (see the module docstring)."""
    for add, value in (
        (writer.add_name, name),
        (writer.add_file_type, int(kind.file_type)),
        (writer.add_quantization_version, gguf.GGML_QUANT_VERSION),
        (writer.add_vocab_size, cfg.vocab_size),
        (writer.add_context_length, cfg.max_position),
        (writer.add_embedding_length, cfg.d_model),
        (writer.add_block_count, cfg.n_layers),
        (writer.add_feed_forward_length, cfg.d_mlp),
        (writer.add_head_count, cfg.n_heads),
        (writer.add_head_count_kv, cfg.n_kv_heads),
        (writer.add_key_length, cfg.head_dim),
        (writer.add_value_length, cfg.head_dim),
        (writer.add_layer_norm_rms_eps, cfg.rms_eps),
        (writer.add_rope_dimension_count, cfg.head_dim),
        (writer.add_rope_freq_base, cfg.rope.theta),
        (writer.add_embedding_scale, cfg.scale_emb),
        (writer.add_residual_scale, cfg.scale_depth / np.sqrt(cfg.n_layers)),
        (writer.add_logit_scale, width_multiplier(cfg)),  # llama.cpp divides the logits by it
    ):
        add(value)
    if cfg.rope.type == "longrope":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_orig_ctx_len(cfg.rope.original_max_position)
        writer.add_rope_scaling_attn_factors(rope_tables(cfg.rope, cfg.head_dim, 1, cfg.max_position)[1])
    else:  # linear / llama3 live in the rope_freqs tensor
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    gguf_vocab.write_vocab(writer, vocab)


def write_gguf(run: RunCheckpoint, vocab: gguf_vocab.Vocab, kind: GGUFType, path: pathlib.Path) -> None:
    """Writes the GGUF file at `path`: metadata, tensor infos, then the tensors one by one from `run`."""
    cfg = run.model_cfg
    plan = tensor_plan(cfg, kind)
    writer = gguf.GGUFWriter(path, ARCH_NAME)
    try:
        write_metadata(writer, cfg, vocab, kind, run.workdir.name)
        for t in plan:
            writer.add_tensor_info(
                t.name,
                gguf.quant_shape_to_byte_shape(t.shape, t.qtype),
                np.dtype(np.uint8),
                t.nbytes,
                raw_dtype=t.qtype,
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(plan, desc="gguf", unit="tensor"):
            if t.spec is None:
                data = t.value
            else:
                data = tensor_data(
                    cfg, t, run.read(t.spec.param, () if t.spec.layer is None else t.spec.layer)
                )
            writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
    finally:
        writer.close()


def llama_cpp_quantize(source: pathlib.Path, target: pathlib.Path, ftype: int) -> None:
    """llama.cpp's quantizer (llama_model_quantize, the K-quants' only implementation) from source to target."""
    llama_cpp = import_extra("llama_cpp", "gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise ValueError(f"llama.cpp could not quantize {source} (see its log above)")


def export_gguf(
    run: RunCheckpoint,
    tokenizer: TextTokenizer,
    out: str | pathlib.Path,
    gguf_type: str,
    allow_dense: bool = False,
) -> pathlib.Path:
    """Writes the run's checkpoint with its tokenizer (a byte-level BPE or a SentencePiece one, gguf_vocab) as
    the new GGUF file `out` (never overwritten)."""
    kind = check_gguf_type(gguf_type, run.model_cfg)
    hf_layout.check_dense_export(run.model_cfg, "gguf", allow_dense)
    if run.model_cfg.rope.type not in GGUF_ROPE_TYPES:  # llama.cpp's yarn scales attention its own way
        raise ConfigError(
            f"model.rope.type={run.model_cfg.rope.type!r}: GGUF export writes {GGUF_ROPE_TYPES} only; export "
            "--format minicpm or llama instead"
        )
    vocab = gguf_vocab.tokenizer_vocab(tokenizer, run.model_cfg.vocab_size)
    out = pathlib.Path(out)
    with fresh_file(out) as tmp:
        if kind.llama_cpp_ftype is None:
            write_gguf(run, vocab, kind, tmp)
        else:
            with temporary_file_beside(out) as source:
                write_gguf(run, vocab, kind, source)
                llama_cpp_quantize(source, tmp, kind.llama_cpp_ftype)
    return out
