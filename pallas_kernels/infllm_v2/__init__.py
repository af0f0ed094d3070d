"""InfLLM v2 trainable sparse attention: block selection and block-sparse attention (MiniCPM4 report section 2.1)."""

from pallas_kernels.infllm_v2.api import IMPLEMENTATIONS, attention, sparse_attention
from pallas_kernels.infllm_v2.config import SparseConfig
from pallas_kernels.infllm_v2.selection import select_blocks

__all__ = ["IMPLEMENTATIONS", "SparseConfig", "attention", "select_blocks", "sparse_attention"]
