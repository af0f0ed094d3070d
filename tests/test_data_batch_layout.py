"""data_pipelines.batch_layout: the (step, global row) -> logical shard rule, process ownership, size errors."""

import collections
import itertools

import pytest

from data_pipelines.batch_layout import BatchLayout


def _reference_shard(row: int, step: int, num_shards: int, global_batch: int) -> int:
    """The rule as specified: K <= B: row r reads r // (B/K); K > B: r * (K/B) + t % (K/B)."""
    if num_shards <= global_batch:
        return row // (global_batch // num_shards)
    return row * (num_shards // global_batch) + step % (num_shards // global_batch)


SIZES = [
    (k, b, p)
    for k, b, p in itertools.product((1, 2, 4, 8, 16, 32), (1, 2, 4, 8, 16), (1, 2, 4, 8))
    if b % p == 0 and k % p == 0 and (b % k == 0 or k % b == 0)
]


@pytest.mark.parametrize("num_shards, global_batch, process_count", SIZES)
def test_rows_follow_the_rule_and_processes_read_only_their_own_block(
    num_shards, global_batch, process_count
):
    one = BatchLayout(num_shards, global_batch, 1)
    layout = BatchLayout(num_shards, global_batch, process_count)
    blocks = [layout.process_shards(p) for p in range(process_count)]
    assert [s for block in blocks for s in block] == list(range(num_shards))  # contiguous, disjoint, complete
    assert len({len(block) for block in blocks}) == 1
    period = max(num_shards // global_batch, 1)
    reads = collections.Counter()
    for step in range(3 * period):
        expected = [_reference_shard(r, step, num_shards, global_batch) for r in range(global_batch)]
        assert one.row_shards(0, step) == expected
        local = [layout.row_shards(p, step) for p in range(process_count)]
        assert [s for rows in local for s in rows] == expected  # independent of the process count
        for p, rows in enumerate(local):
            assert set(rows) <= set(blocks[p])
        reads.update(expected)
    assert set(reads) == set(range(num_shards))
    assert len(set(reads.values())) == 1  # every shard feeds the same number of rows


@pytest.mark.parametrize(
    "num_shards, global_batch, process_count, message",
    [
        (6, 4, 2, r"data.num_logical_shards \(6\) .* global train.batch_size \(4\)"),
        (8, 12, 4, r"data.num_logical_shards \(8\) .* global train.batch_size \(12\)"),
        (2, 8, 4, r"data.num_logical_shards \(2\) must be a multiple of the process count \(4\)"),
        (8, 6, 4, r"global train.batch_size \(6\) is not divisible by the process count \(4\)"),
        (0, 8, 1, r"must all be at least 1"),
    ],
)
def test_incompatible_sizes_are_clear_errors(num_shards, global_batch, process_count, message):
    with pytest.raises(ValueError, match=message):
        BatchLayout(num_shards, global_batch, process_count)


def test_a_process_index_outside_the_process_count_is_an_error():
    with pytest.raises(ValueError, match=r"process index 4 is not in \[0, 4\)"):
        BatchLayout(8, 8, 4).process_shards(4)
