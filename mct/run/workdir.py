"""Step-0 workdirs (imports, upcycles) written whole: filled in a temporary sibling and renamed
(`data_pipelines.output_dirs`), so nothing is ever left half-written or overwritten."""

import pathlib

import jax
import jax.numpy as jnp

from data_pipelines.output_dirs import fresh_directory
from data_pipelines.tokenizer import TextTokenizer
from mct.config.run import Config
from mct.model.decoder import ParamsModel
from mct.run.checkpoint import Checkpointer, run_meta
from mct.train.optimizer import make_optimizer


def write_step0_workdir(
    out: str, config: Config, params: dict, tokenizer: TextTokenizer | None, **provenance
) -> pathlib.Path:
    """A new workdir `out` whose step 0 holds `params` with a fresh optimizer state (and `tokenizer`'s files
    when given): what mct.train resumes from. Written to a temporary sibling and renamed, so nothing is
    left half-written when anything fails."""
    params = jax.tree.map(jnp.asarray, params)
    state = {
        "params": params,
        "opt_state": jax.jit(make_optimizer(config, ParamsModel(config.model)).init)(params),
    }
    with fresh_directory(out) as tmp:
        if tokenizer is not None:
            tokenizer.save(tmp)
        ckpt = Checkpointer(str(tmp), async_save=False)
        ckpt.save(0, state, None, run_meta(config, 0, **provenance))
        ckpt.wait()
        ckpt.close()
    return pathlib.Path(out)
