"""Stage data mixtures (MiniCPM4 report section 2.2): component name -> prepared dataset dir, weight, length filter.

Directories are produced by `python -m data_pipelines.prepare ... --out DIR`; DATA_ROOT is where a cluster
keeps them. Weights are relative.
"""

import ml_collections

from data_pipelines.config import long_context_mixture
from experiments.configs.base import mixture

DATA_ROOT = "/data/mct"


def _mix(weights: dict[str, float], root: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            name: dict(path=f"{root}/{name}", weight=w, min_tokens=0, max_tokens=0)
            for name, w in weights.items()
        }
    )


def pretrain_mixture(root: str = DATA_ROOT) -> ml_collections.ConfigDict:
    """Stable-phase mix: filtered web text dominates, with code, math and knowledge-heavy sources."""
    return _mix({"web": 0.70, "code": 0.15, "math": 0.08, "books": 0.07}, root)


def anneal_mixture(root: str = DATA_ROOT) -> ml_collections.ConfigDict:
    """Decay-phase (annealing) mix: high-quality text plus SFT-like instruction data."""
    return _mix({"web_hq": 0.40, "code": 0.20, "math": 0.20, "sft_like": 0.20}, root)


def long_context_stage_mixture(root: str = DATA_ROOT, max_tokens: int = 32768) -> ml_collections.ConfigDict:
    """Long-context stage: length buckets 0-4K / 4-12K / 12-24K / 24-32K at 1:1:1:1 of long documents."""
    return mixture(long_context_mixture(f"{root}/long", max_tokens))
