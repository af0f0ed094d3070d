"""Which logical shard fills each row of each global batch: a fixed rule that does not depend on the number
of processes, so a global batch holds the same tokens on 1, 2 or 4 processes.

With K logical shards and B global rows: if K <= B, row r reads shard r // (B/K) (B/K consecutive rows per
shard); if K > B, row r at step t reads shard r * (K/B) + t % (K/B) (each row rotates over K/B shards).
Process p supplies rows [p*B/P, (p+1)*B/P) and so owns exactly the shards [p*K/P, (p+1)*K/P).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """The row -> logical shard rule for `num_shards` (K) shards, `global_batch` (B) rows, `process_count` (P)."""

    num_shards: int
    global_batch: int
    process_count: int

    def __post_init__(self):
        k, b, p = self.num_shards, self.global_batch, self.process_count
        if min(k, b, p) < 1:
            raise ValueError(
                f"data.num_logical_shards ({k}), the global train.batch_size ({b}) and the process count ({p}) "
                "must all be at least 1"
            )
        if b % p:
            raise ValueError(f"the global train.batch_size ({b}) is not divisible by the process count ({p})")
        if k % p or (b % k and k % b):
            raise ValueError(
                f"data.num_logical_shards ({k}) must be a multiple of the process count ({p}) and must divide "
                f"or be a multiple of the global train.batch_size ({b})"
            )

    def process_shards(self, process_index: int) -> range:
        """The logical shards process `process_index` reads: a contiguous block of K/P shards."""
        self._check_process(process_index)
        per_process = self.num_shards // self.process_count
        return range(process_index * per_process, (process_index + 1) * per_process)

    def row_shards(self, process_index: int, step: int) -> list[int]:
        """The logical shard of each of this process's rows (global rows [p*B/P, (p+1)*B/P)) at `step`."""
        self._check_process(process_index)
        rows_per_shard = max(self.global_batch // self.num_shards, 1)
        shards_per_row = max(self.num_shards // self.global_batch, 1)
        local_rows = self.global_batch // self.process_count
        first_row = process_index * local_rows
        return [
            (r // rows_per_shard) * shards_per_row + step % shards_per_row
            for r in range(first_row, first_row + local_rows)
        ]

    def _check_process(self, process_index: int) -> None:
        if not 0 <= process_index < self.process_count:
            raise ValueError(f"process index {process_index} is not in [0, {self.process_count})")
