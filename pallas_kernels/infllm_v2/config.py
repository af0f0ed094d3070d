"""InfLLM v2 sparse-attention settings (MiniCPM4 report section 2.1): one frozen, hashable record, jit-static."""

import dataclasses

IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu")  # sparse attention kernels
LSE_POOL = 4  # the LSE approximation's coarse keys C2 pool 4x the kernel size and stride


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """Block selection and sparse attention settings; defaults are the MiniCPM4.1 ones.

    block_size: tokens per K/V block. kernel_size / kernel_stride: mean-pooling window and stride of the
    compressed keys (the LSE approximation pools 4x coarser). init_blocks: leading blocks of the document
    always attended. window_size: tokens of local blocks always attended (window_size // block_size blocks,
    the query's own block included). topk: blocks per query, forced ones included. dense_len: below this
    length `attention` runs dense. lse_approx: normalise compressed scores with the coarse LSE. use_nope:
    the caller selects blocks from q, k without RoPE (it passes `block_indices` to the attention).
    """

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 96
    dense_len: int = 8192
    lse_approx: bool = True
    use_nope: bool = False

    def __post_init__(self):
        for name in ("block_size", "kernel_size", "kernel_stride", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"SparseConfig.{name} must be positive; got {getattr(self, name)}")
        if self.init_blocks < 0 or self.dense_len < 0:
            raise ValueError(f"SparseConfig.init_blocks / dense_len must be >= 0; got {self}")
        if self.block_size % self.kernel_stride or self.kernel_size % self.kernel_stride:
            raise ValueError(
                f"SparseConfig: block_size {self.block_size} and kernel_size {self.kernel_size} must be "
                f"multiples of kernel_stride {self.kernel_stride}"
            )
        if self.window_size < self.block_size or self.window_size % self.block_size:
            raise ValueError(
                f"SparseConfig.window_size {self.window_size} must be a positive multiple of "
                f"block_size {self.block_size}"
            )
        if self.topk < self.init_blocks + self.local_blocks:
            raise ValueError(
                f"SparseConfig.topk {self.topk} must cover the forced blocks: "
                f"init_blocks {self.init_blocks} + local blocks {self.local_blocks}"
            )

    @property
    def coarse_kernel_size(self) -> int:
        """Window of the coarse compressed keys C2 (LSE approximation)."""
        return LSE_POOL * self.kernel_size

    @property
    def coarse_kernel_stride(self) -> int:
        """Stride of the coarse compressed keys C2 (LSE approximation)."""
        return LSE_POOL * self.kernel_stride

    @property
    def local_blocks(self) -> int:
        """Number of local blocks, the query's own block included."""
        return self.window_size // self.block_size
