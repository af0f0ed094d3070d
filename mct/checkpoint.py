"""Orbax checkpoints of a run: train state (sharded arrays), data-iterator state and run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Only committed steps are listed and restored;
a save interrupted by a kill leaves a tmp directory that orbax ignores. Saves are async by default.
"""

import logging
import pathlib
import time

import jax
import ml_collections
import orbax.checkpoint as ocp

from mct.sharding import ConfigError

log = logging.getLogger(__name__)
COMMIT_MARKER = "commit_success.txt"
ITEMS = ("state", "data", "meta")

# Model fields that must match for a checkpoint to be restored into a run.
SHAPE_KEYS = (
    "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_mlp", "vocab_size", "tie_embeddings",
)  # fmt: skip


def model_signature(model_cfg: ml_collections.ConfigDict) -> dict:
    return {k: model_cfg[k] for k in SHAPE_KEYS}


class Checkpointer:
    """A CheckpointManager over WORKDIR/checkpoints; read_only for a source run a branch starts from."""

    def __init__(self, workdir: str, *, max_to_keep: int | None = None, async_save: bool = True,
                 read_only: bool = False):  # fmt: skip
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"no checkpoints directory in {workdir}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state) -> tuple[dict, dict, dict]:
        """Restores (state, data_state, meta) onto the shardings given by `abstract_state`'s leaves."""
        if step not in self.all_steps():
            raise FileNotFoundError(
                f"checkpoint step {step} not found in {self.directory}; have {self.all_steps()}"
            )
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["data"], out["meta"]

    def check_compatible(self, step: int, model_cfg: ml_collections.ConfigDict) -> dict:
        """Raises ConfigError naming the differing fields when the checkpoint holds another model shape."""
        meta = self.read_meta(step)
        saved, wanted = meta["model_signature"], model_signature(model_cfg)
        diff = {k: (saved.get(k), wanted[k]) for k in wanted if saved.get(k) != wanted[k]}
        if diff:
            details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(
                f"{self.directory} holds a checkpoint (step {step}) of an incompatible model ({details}); "
                "use a new workdir or the matching config"
            )
        return meta

    def is_complete(self, step: int) -> bool:
        """Every commit marker of the step is present (a copied or half-deleted checkpoint lacks some)."""
        step_dir = self.directory / str(step)
        return all((d / COMMIT_MARKER).is_file() for d in (step_dir, *(step_dir / item for item in ITEMS)))

    def restore_latest(self, abstract_state, model_cfg: ml_collections.ConfigDict):
        """(step, state, data_state) of the newest checkpoint that restores, or None when there is none.

        An incomplete or unreadable checkpoint is moved aside to STEP.corrupt-TIME (never deleted) with a
        warning, and the previous one is tried; if none is left, the error says so. An incompatible model
        is a ConfigError, not corruption.
        """
        steps = sorted(self.all_steps(), reverse=True)
        for step in steps:
            try:
                if not self.is_complete(step):
                    raise FileNotFoundError(f"missing {COMMIT_MARKER}")
                self.check_compatible(step, model_cfg)
                state, data_state, _ = self.restore(step, abstract_state)
                return step, state, data_state
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
                aside = self.directory / f"{step}.corrupt-{int(time.time())}"
                log.warning("checkpoint %s/%d is unreadable (%s); moved to %s, trying the previous one",
                            self.directory, step, str(e).splitlines()[0][:200], aside.name)  # fmt: skip
                if jax.process_index() == 0:
                    (self.directory / str(step)).rename(aside)
                self.manager.reload()
        if steps:
            raise FileNotFoundError(f"no readable checkpoint left in {self.directory} (tried steps {steps})")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: what StandardRestore restores onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
