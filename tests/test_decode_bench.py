"""experiments/benchmarks/decode.py at a tiny size: every (quant, batch) row is measured, both loops decode."""

from experiments.benchmarks.decode import measure
from tests.test_decoding import tiny_cfg


def test_decode_benchmark_measures_every_row():
    cfg = tiny_cfg(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_mlp=256)  # int4's groups of 128
    result = measure(cfg, prompt_len=6, max_new=4, batches=[1, 3], quants=["none", "int4"], repeats=1)
    assert [(r["quant"], r["batch"]) for r in result["rows"]] == [
        ("none", 1),
        ("none", 3),
        ("int4", 1),
        ("int4", 3),
    ]
    for row in result["rows"]:
        assert row["before_tokens_per_s"] > 0 and row["after_tokens_per_s"] > 0
    fp32, int4 = result["rows"][0]["step_weight_mb"], result["rows"][2]["step_weight_mb"]
    assert int4 < fp32 and result["bandwidth_gb_s"] > 0
