"""The analytic FLOPs (mct/model/flops.py) against their closed form written out by hand from the architecture,
for the variants whose terms are easy to get wrong: MoE (router + top_k experts), MTP blocks (a projection, a
dense block and one more pass of the head), untied heads (the embedding lookup is no matmul), GQA, and long
sequences (where the attention term dominates)."""

import pytest

from mct.config.run import Config
from mct.model.flops import train_flops_per_token

SEQ = 131072


def closed_form(m: dict, seq: int) -> float:
    """6 x matmul parameters one token runs through + 6 x attention layers x seq x heads x head_dim."""
    d, q, kv = m["d_model"], m["n_heads"] * m["head_dim"], m["n_kv_heads"] * m["head_dim"]
    attention = 2 * d * q + 2 * d * kv  # wq, wo; wk, wv
    mlp = 3 * d * m["d_mlp"]  # SwiGLU: gate, up, down
    moe = m.get("moe", {})
    ffn = d * moe["num_experts"] + moe["top_k"] * mlp if moe else mlp  # router + the experts a token runs
    head = m["vocab_size"] * d  # tied or not, one vocab x d matmul (an untied embedding is a lookup)
    depth = m.get("mtp", {}).get("depth", 0)
    mtp_block = 2 * d * d + attention + mlp + head  # concat projection, a dense block, the shared head again
    params = m["n_layers"] * (attention + ffn) + head + depth * mtp_block
    return 6.0 * params + 6.0 * (m["n_layers"] + depth) * seq * q


BASE = dict(n_layers=3, d_model=96, n_heads=6, n_kv_heads=2, head_dim=32, d_mlp=160, vocab_size=500)


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"tie_embeddings": False},
        {"moe": {"num_experts": 8, "top_k": 2}, "tie_embeddings": False},
        {"mtp": {"depth": 2}},
        {"moe": {"num_experts": 4, "top_k": 1}, "mtp": {"depth": 1}, "tie_embeddings": False},
    ],
    ids=["dense-tied", "untied", "moe-untied", "mtp", "moe-mtp-untied"],
)
def test_flops_per_token_match_the_closed_form(variant):
    m = {**BASE, **variant}
    cfg = Config.from_dict({"model": m}).model
    for seq in (128, SEQ):
        assert train_flops_per_token(cfg, seq) == closed_form(m, seq)
