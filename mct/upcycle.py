"""Sparse upcycling (MiniCPM paper section 7, MiniCPM-MoE): a dense run's checkpoint becomes step 0 of an MoE run.

    python -m mct.upcycle --from DENSE_WORKDIR [--step N] --out MOE_WORKDIR --config experiments/configs/X.py

Every expert of a layer starts as a copy of that layer's MLP; the routers are drawn N(0, model.moe.
router_init_std); attention, norms, embeddings (and MTP blocks) are copied unchanged; the optimizer state is
fresh. Since the top-k weights sum to 1 and the experts are equal, the upcycled model computes the dense
model's function exactly (while no token is dropped). Train on with `python -m mct.train --config ...
--config.workdir=MOE_WORKDIR`, which resumes from that step 0.
"""

import pathlib

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from data_pipelines.shards import TOKENIZER
from mct import cli
from mct.checkpoint import model_signature
from mct.config import Config, ModelConfig
from mct.import_hf import write_step0_workdir
from mct.model import ParamsModel
from mct.run_reader import RunCheckpoint

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
            raise ValueError(f"upcycle: {name} has shape {out[name].shape}, the MoE model wants {value.shape}")
    return out


def upcycle(dense_workdir: str, step: int | None, out: str, config: Config) -> pathlib.Path:
    """Writes the new workdir `out` with the upcycled params of `dense_workdir` (step `step`, default latest)
    as step 0 of `config`'s run; returns its path. Nothing is written when anything fails."""
    run = RunCheckpoint(dense_workdir, step)
    if run.model_cfg.moe.num_experts:
        raise cli.UserError(f"upcycle: {dense_workdir} step {run.step} is already an MoE model")
    if not config.model.moe.num_experts:
        raise cli.UserError("upcycle: the --config has model.moe.num_experts=0; set it (e.g. 8) for the MoE run")
    model_cfg = config.model
    dense_sig, moe_sig = model_signature(run.model_cfg), model_signature(model_cfg)
    diff = {k: (dense_sig[k], moe_sig[k]) for k in dense_sig if dense_sig[k] != moe_sig[k] and k != "moe.num_experts"}
    if diff:
        raise cli.UserError(f"upcycle: the --config's model differs from {dense_workdir}'s beyond model.moe "
                            f"(dense vs config: {diff})")  # fmt: skip
    config = config.replace(workdir=str(out)).resolve()
    params = upcycle_params(run.read_params(), model_cfg, config.seed)
    return write_step0_workdir(out, config, params, pathlib.Path(dense_workdir) / TOKENIZER,
                               upcycled_from=f"{pathlib.Path(dense_workdir).absolute()}:{run.step}")  # fmt: skip


def _define_flags() -> None:
    flags.DEFINE_string("from", None, "Dense training workdir to upcycle.", required=True)
    flags.DEFINE_integer("step", None, "Its checkpoint step (default: the latest; MiniCPM: a stable-phase one).")
    flags.DEFINE_string("out", None, "New (or empty) workdir of the MoE run.", required=True)
    config_flags.DEFINE_config_file("config", None, "The MoE run's config (model.moe.num_experts > 0).")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's save chatter
    f = flags.FLAGS
    if not f.config:
        raise cli.UserError("upcycle: pass --config (the MoE run's config file)")
    config = cli.config_from_flag(f.config)
    try:
        out = upcycle(f["from"].value, f.step, f.out, config)
    except (OSError, ValueError) as e:
        raise cli.UserError(str(e)) from None
    experts = config.model.moe.num_experts
    print(f"upcycled {f['from'].value} into {out} (step 0, {experts} experts, top-{config.model.moe.top_k}); "
          f"train on with: python -m mct.train --config ... --config.workdir={out}")  # fmt: skip


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
