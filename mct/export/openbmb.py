"""OpenBMB's MiniCPM release format (MiniCPM4-0.5B / 8B on the Hub): its config.json fields and their meaning.

A release config.json has no `model_type` (transformers finds the classes through `auto_map`, OpenBMB's remote
code), leaves out every field equal to `MiniCPMConfig`'s default (tied embeddings among them), and writes InfLLM v2
as `sparse_config` (null or absent: dense). Its `topk` counts the selected blocks beside the sliding window of
`window_size` tokens, which OpenBMB's kernel attends separately; mct's `model.sparse.topk` counts the window's
blocks inside topk (docs/design.md, "The MiniCPM release format"). Import and export convert between the two here,
so the attended set is the same.
"""

from collections.abc import Mapping

from pallas_kernels.infllm_v2.config import SparseConfig

ARCHITECTURE = "MiniCPMForCausalLM"
# The release's auto_map: OpenBMB's remote code, shipped beside the weights of each release.
AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
}
# MiniCPMConfig.__init__'s defaults (configuration_minicpm.py of the MiniCPM4 releases) for the fields mct reads:
# what a release config.json leaves out means these.
CONFIG_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "scale_emb": 1,
    "dim_model_base": 1,
    "scale_depth": 1,
}
# The sparse_config fields OpenBMB's modeling code reads, with the defaults it reads them with.
SPARSE_DEFAULTS = {
    "kernel_size": 32,
    "kernel_stride": 16,
    "init_blocks": 1,
    "block_size": 64,
    "window_size": 2048,
    "topk": 64,
    "use_nope": False,
    "dense_len": 8192,
}


def sparse_from_release(sparse: object, path: str) -> dict:
    """mct's model.attention / model.sparse fields for a release's sparse_config (None: dense, {}).

    topk: OpenBMB's selected blocks (init blocks included) beside the window of window_size // block_size
    blocks; mct's topk counts the window too, so it is OpenBMB's plus the window's blocks."""
    if sparse is None:
        return {}
    s = _release_sparse(sparse, path)
    window_blocks = s["window_size"] // max(s["block_size"], 1)
    try:
        settings = SparseConfig(**{**s, "topk": s["topk"] + window_blocks, "lse_approx": True})
    except ValueError as e:
        raise ValueError(f"{path}: sparse_config {sparse}: {e}") from None
    return {
        "attention": "infllm_v2",
        "sparse": {k: getattr(settings, k) for k in (*SPARSE_DEFAULTS, "lse_approx")},
    }


def _release_sparse(sparse: object, path: str) -> dict:
    """A release's sparse_config with OpenBMB's defaults filled in; a field mct cannot honour is a ValueError
    naming it and the file."""
    if not isinstance(sparse, Mapping):
        raise ValueError(f"{path}: sparse_config must be null or an object, not {type(sparse).__name__}")
    unknown = sorted(set(sparse) - set(SPARSE_DEFAULTS))
    if unknown:
        raise ValueError(
            f"{path}: sparse_config.{unknown[0]} is not supported (mct reads {', '.join(SPARSE_DEFAULTS)})"
        )
    s = {**SPARSE_DEFAULTS, **sparse}
    if s["use_nope"] is not False:
        raise ValueError(
            f"{path}: sparse_config.use_nope={s['use_nope']!r} is not supported: mct selects blocks from q, k "
            "after RoPE"
        )
    for key, value in s.items():
        if key != "use_nope" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{path}: sparse_config.{key} must be a non-negative integer, got {value!r}")
    if s["topk"] < s["init_blocks"]:
        raise ValueError(
            f"{path}: sparse_config.topk {s['topk']} must count its init_blocks {s['init_blocks']}"
        )
    return s


def sparse_to_release(sparse: SparseConfig) -> dict:
    """The release's sparse_config for mct's settings: topk without the window's blocks (sparse_from_release's
    inverse). Settings OpenBMB's format has no field for are refused."""
    if not sparse.lse_approx or sparse.use_nope:
        raise ValueError(
            f"model.sparse.lse_approx={sparse.lse_approx}, use_nope={sparse.use_nope}: OpenBMB's sparse_config "
            "has no field for these; its kernel normalises with the coarse LSE and selects after RoPE"
        )
    fields = {k: getattr(sparse, k) for k in SPARSE_DEFAULTS}
    return {**fields, "topk": sparse.topk - sparse.local_blocks}
