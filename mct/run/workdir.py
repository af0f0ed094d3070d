"""New directories written whole: filled in a temporary sibling and renamed, so nothing is ever left
half-written or overwritten (exports, imported and upcycled workdirs)."""

import contextlib
import os
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp

from data_pipelines.shards import TOKENIZER
from mct.config.run import Config
from mct.model.decoder import ParamsModel
from mct.run.checkpoint import Checkpointer, run_meta
from mct.train.optimizer import make_optimizer


@contextlib.contextmanager
def fresh_directory(out: str | pathlib.Path):
    """Yields a temporary sibling of `out` to fill; it becomes `out` on success and vanishes on failure.

    `out` must not exist or be an empty directory, so nothing is ever overwritten.
    """
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out} already exists and is not empty; choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_step0_workdir(
    out: str, config: Config, params: dict, tokenizer: pathlib.Path, **provenance
) -> pathlib.Path:
    """A new workdir `out` whose step 0 holds `params` with a fresh optimizer state (and a copy of `tokenizer`
    if it exists): what mct.train resumes from. Written to a temporary sibling and renamed, so nothing is
    left half-written when anything fails."""
    params = jax.tree.map(jnp.asarray, params)
    state = {
        "params": params,
        "opt_state": jax.jit(make_optimizer(config, ParamsModel(config.model)).init)(params),
    }
    with fresh_directory(out) as tmp:
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        ckpt = Checkpointer(str(tmp), async_save=False)
        ckpt.save(0, state, None, run_meta(config, 0, **provenance))
        ckpt.wait()
        ckpt.close()
    return pathlib.Path(out)
