"""ModelTunnel wind-tunnel proxies (MiniCPM paper section 3; MiniCPM4 report section 4.1), one per shape:
`--config experiments/configs/tunnel.py:30m`. TUNNEL_SHAPES: name -> (d_model, d_mlp, heads, layers)."""

import ml_collections

from experiments.configs.base import base_config, model_config

TUNNEL_SHAPES = {
    "9m": (320, 800, 5, 8),
    "30m": (512, 1280, 8, 12),
    "70m": (640, 1600, 10, 14),
    "100m": (768, 1920, 12, 16),
    "170m": (896, 2240, 14, 18),
    "200m": (1024, 2560, 16, 20),
    "500m": (1344, 3360, 21, 24),
}
TUNNEL_VOCAB = 32768


def tunnel_config(name: str) -> ml_collections.ConfigDict:
    """A proxy run: head_dim 64, multi-head attention, tied embeddings, on the default corpus."""
    d_model, d_mlp, heads, layers = TUNNEL_SHAPES[name]
    c = base_config()
    c.workdir = f"/tmp/mct-tunnel-{name}"
    c.model = model_config(
        n_layers=layers,
        d_model=d_model,
        n_heads=heads,
        n_kv_heads=heads,
        head_dim=64,
        d_mlp=d_mlp,
        vocab_size=TUNNEL_VOCAB,
    )
    c.model.scan_layers = False  # <= 24 layers: unrolled compiles fast and runs faster on CPU
    c.model.loss_chunk = 128  # [batch, 128, 32768] fp32 logits at a time instead of the whole sequence's
    c.data.vocab_size = TUNNEL_VOCAB
    c.data.seq_len = 1024
    c.train.steps = 2000
    c.train.batch_size = 32
    c.schedule.warmup_fraction = 0.05
    c.schedule.decay_fraction = 0.1
    c.eval.every_steps = 500
    c.checkpoint.every_steps = 500
    return c


def moe_tunnel_config(name: str) -> ml_collections.ConfigDict:
    """The proxy as MiniCPM-MoE (MiniCPM paper section 7): 8 experts of the parent's MLP shape, top-2, so a
    dense proxy's checkpoint upcycles into it (mct.upcycle); model.moe.capacity_factor 1.25 drops overflow."""
    c = tunnel_config(name)
    c.workdir = f"/tmp/mct-tunnel-{name}-moe"
    c.model.moe.num_experts, c.model.moe.top_k, c.model.moe.capacity_factor = 8, 2, 1.25
    return c


def get_config(shape: str = "30m") -> ml_collections.ConfigDict:
    """SHAPE (dense) or SHAPE_moe (its MoE variant)."""
    name, moe = shape.removesuffix("_moe"), shape.endswith("_moe")
    if name not in TUNNEL_SHAPES:
        raise ValueError(f"tunnel config: unknown shape {shape!r}; one of {sorted(TUNNEL_SHAPES)} (+ _moe)")
    return moe_tunnel_config(name) if moe else tunnel_config(name)
