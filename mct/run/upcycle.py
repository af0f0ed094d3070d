"""Sparse upcycling (MiniCPM paper section 7, MiniCPM-MoE): a dense run's checkpoint becomes step 0 of an MoE run.

Every expert of a layer starts as a copy of that layer's MLP; the routers are drawn N(0, model.moe.
router_init_std); attention, norms, embeddings (and MTP blocks) are copied unchanged; the optimizer state is
fresh. Since the top-k weights sum to 1 and the experts are equal, the upcycled model computes the dense
model's function exactly (while no token is dropped).
"""

import pathlib

import numpy as np

from data_pipelines.tokenizer import has_tokenizer, load_tokenizer
from mct.config.model import ModelConfig
from mct.config.run import Config
from mct.errors import UserError
from mct.model.decoder import ParamsModel
from mct.run.checkpoint import model_signature
from mct.run.reader import RunCheckpoint
from mct.run.workdir import write_step0_workdir

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def upcycle_params(dense_params: dict, cfg: ModelConfig, seed: int) -> dict:
    """An MoE params dict (of `cfg`, model.moe.num_experts > 0) from a dense one of the same shape: each MLP
    matrix [layers, ...] repeated on a new expert axis [layers, experts, ...], routers freshly initialised."""
    fresh = ParamsModel(cfg).init(seed)
    out = {}
    for name, value in fresh.items():
        if name in EXPERT_WEIGHTS:
            dense = np.asarray(dense_params[name])  # [layers, a, b]
            out[name] = np.repeat(dense[:, None], cfg.moe.num_experts, axis=1)
        elif name == "router":
            out[name] = np.asarray(value)
        else:
            out[name] = np.asarray(dense_params[name])
        if out[name].shape != value.shape:
            raise ValueError(
                f"upcycle: {name} has shape {out[name].shape}, the MoE model wants {value.shape}"
            )
    return out


def upcycle(dense_workdir: str, step: int | None, out: str, config: Config) -> pathlib.Path:
    """Writes the new workdir `out` with the upcycled params of `dense_workdir` (step `step`, default latest)
    as step 0 of `config`'s run; returns its path. Nothing is written when anything fails."""
    run = RunCheckpoint(dense_workdir, step)
    if run.model_cfg.moe.num_experts:
        raise UserError(f"upcycle: {dense_workdir} step {run.step} is already an MoE model")
    if not config.model.moe.num_experts:
        raise UserError("upcycle: the --config has model.moe.num_experts=0; set it (e.g. 8) for the MoE run")
    model_cfg = config.model
    dense_sig, moe_sig = model_signature(run.model_cfg), model_signature(model_cfg)
    diff = {
        k: (dense_sig[k], moe_sig[k])
        for k in dense_sig
        if dense_sig[k] != moe_sig[k] and k != "moe.num_experts"
    }
    if diff:
        raise UserError(
            f"upcycle: the --config's model differs from {dense_workdir}'s beyond model.moe "
            f"(dense vs config: {diff})"
        )
    config = config.replace(workdir=str(out)).resolve()
    params = upcycle_params(run.read_params(), model_cfg, config.seed)
    return write_step0_workdir(
        out,
        config,
        params,
        load_tokenizer(dense_workdir) if has_tokenizer(dense_workdir) else None,
        upcycled_from=f"{pathlib.Path(dense_workdir).absolute()}:{run.step}",
    )
