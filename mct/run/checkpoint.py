"""Orbax checkpoints of a run: train state (sharded arrays), data-iterator state and run metadata. The one
module that knows their layout and talks to orbax (its public API, but for `_orbax_write_threads`).

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Only committed steps are listed and restored;
a save interrupted by a kill leaves a tmp directory that orbax ignores. Saves are async by default, but a
step's directories are made in `save` itself, so a directory that cannot be written (read-only) fails that
call at once; a save that fails later (e.g. on a full disk) has its tmp directory removed and raises
CheckpointSaveError at the next check_saves, save or wait. `Checkpointer` writes and resumes a run;
`read_step` opens a finished run's step once (meta and data state) and `SavedStep` reads its params without
the rest of the state, one at a time.
"""

import dataclasses
import functools
import logging
import os
import pathlib
import re
import shutil
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from mct.config.model import ModelConfig
from mct.config.run import Config
from mct.errors import CheckpointMissing, CheckpointSaveError, ConfigError

log = logging.getLogger(__name__)
COMMIT_MARKER = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
ITEMS = ("state", "data", "meta")
# tensorstore puts the OS error in its message: "... No space left on device [os_error_code='28']"
OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")

# Model fields that must match for a checkpoint to be restored into a run (dotted: a nested field).
SHAPE_KEYS = (
    "n_layers",
    "d_model",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "d_mlp",
    "vocab_size",
    "tie_embeddings",
    "moe.num_experts",
    "mtp.depth",
)
ASIDE = ".corrupt-"  # STEP.corrupt-TIME: an unreadable checkpoint moved aside by restore_latest
# What a checkpoint written before a key existed holds for it.
_SIGNATURE_DEFAULTS = {"moe.num_experts": 0, "mtp.depth": 0}


def model_signature(model_cfg: ModelConfig) -> dict:
    """The shape fields a checkpoint records and a restore compares."""
    return {k: functools.reduce(getattr, k.split("."), model_cfg) for k in SHAPE_KEYS}


def run_meta(config: Config, step: int, **provenance) -> dict:
    """The metadata every checkpoint of a run records: its config, model shape, data mixture, decay start
    and step, plus where its weights came from (an import, an upcycle) when they did not come from training."""
    as_dict = config.to_dict()
    return {
        "config": as_dict,
        "model_signature": model_signature(config.model),
        "data_mixture": as_dict["data"]["mixture"],
        "decay_start": config.decay_start,
        "step": step,
        **provenance,
    }


def _check_signature(meta: dict, model_cfg: ModelConfig, directory: pathlib.Path, step: int) -> None:
    """ConfigError naming the differing fields when the meta of checkpoint `step` in `directory` records another
    model shape than `model_cfg`."""
    saved, wanted = {**_SIGNATURE_DEFAULTS, **meta["model_signature"]}, model_signature(model_cfg)
    diff = {k: (saved.get(k), wanted[k]) for k in wanted if saved.get(k) != wanted[k]}
    if diff:
        details = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"{directory} holds a checkpoint (step {step}) of an incompatible model ({details}); "
            "use a new workdir or the matching config"
        )


def root_cause(error: BaseException) -> str:
    """One line on why `error` happened: the OS error's text where the exception chain holds one, else the
    innermost exception's first line."""
    chain = [error]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and inner not in chain:
        chain.append(inner)
    for e in chain:
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
        if match := OS_ERROR_CODE.search(str(e)):
            return os.strerror(int(match.group(1)))
    lines = str(chain[-1]).strip().splitlines()
    return lines[0][:300] if lines else type(chain[-1]).__name__


def _orbax_write_threads() -> list[threading.Thread]:
    """The threads of orbax's pending writes (its commit futures' threads, class _SignalingThread).

    The one place mct names an orbax private: orbax 0.12 has no public handle on the writes of a save that
    failed (its error is raised at the first failed write, while the others go on), and telling them from
    its pools' idle threads, which never end, takes the class.
    """
    return [t for t in threading.enumerate() if type(t).__name__ == "_SignalingThread"]


def _join_write_threads(timeout_s: float) -> None:
    """Waits for orbax's write threads: a save fails at its first failed write while the others may still be
    creating files in its tmp directory."""
    deadline = time.monotonic() + timeout_s
    for thread in _orbax_write_threads():
        try:
            thread.join(max(deadline - time.monotonic(), 0.0))
        except Exception:  # noqa: BLE001 - orbax's join re-raises the thread's write error: already reported
            pass


def _remove_tmp_dirs(directory: pathlib.Path, step: int) -> None:
    """Removes the temporary directories a failed save of `step` left in `directory` (orbax's own listing)."""
    for tmp in ocp.path.step.all_temporary_paths(directory):
        path = tmp.get()
        if ocp.path.step.step_from_checkpoint_name(path.name) == step:
            shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """A CheckpointManager over WORKDIR/checkpoints; read_only for a source run a branch starts from."""

    def __init__(
        self,
        workdir: str | pathlib.Path,
        *,
        max_to_keep: int | None = None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise CheckpointMissing(f"{workdir} is not a training workdir: it has no checkpoints/ directory")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            # Made in the background, a step directory that cannot be made would leave orbax's item writes
            # waiting for its "directory created" signal for orbax's 300 s coordination timeout, keeping the
            # process alive long after the failure was reported; made in save(), it fails that call.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )
        self._saving: int | None = None  # the step of the last save, until its success is known

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> None:
        """Saves the step (in the background when async). Raises CheckpointSaveError if this save or the
        previous one failed."""
        self.wait()  # a failure of the previous save is reported with its own step
        self._saving = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=force,
            )
        except Exception as e:
            self._saving = None
            raise self._save_failed(step, e) from e

    def check_saves(self) -> None:
        """Raises CheckpointSaveError once the last save has failed; returns at once while it is still
        running or when it succeeded, so the train loop can call it after every step."""
        if self._saving is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def _save_failed(self, step: int, error: Exception) -> CheckpointSaveError:
        """Removes the failed step's tmp directory; the error names the cause and the last good checkpoint."""
        if jax.process_index() == 0:
            _join_write_threads(timeout_s=60.0)
            _remove_tmp_dirs(self.directory, step)
        self.manager.reload()  # from disk: the failed save may have dropped steps max_to_keep would delete
        good = self.latest_step()
        return CheckpointSaveError(
            f"checkpoint save at step {step} failed: {root_cause(error)} in {self.directory}; "
            f"last good checkpoint: {'none' if good is None else f'step {good}'}"
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

    def check_compatible(self, step: int, model_cfg: ModelConfig) -> dict:
        """The step's meta; ConfigError naming the differing fields when it holds another model shape."""
        meta = self.read_meta(step)
        _check_signature(meta, model_cfg, self.directory, step)
        return meta

    def is_complete(self, step: int) -> bool:
        """Every commit marker of the step is present (a copied or half-deleted checkpoint lacks some)."""
        step_dir = self.directory / str(step)
        return all((d / COMMIT_MARKER).is_file() for d in (step_dir, *(step_dir / item for item in ITEMS)))

    def restore_latest(self, abstract_state, model_cfg: ModelConfig):
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
                aside = self.directory / f"{step}{ASIDE}{int(time.time())}"
                log.warning(
                    "checkpoint %s/%d is unreadable (%s); moved to %s, trying the previous one",
                    self.directory,
                    step,
                    str(e).splitlines()[0][:200],
                    aside.name,
                )
                if jax.process_index() == 0:
                    (self.directory / str(step)).rename(aside)
                self.manager.reload()
        if steps:
            raise CheckpointMissing(f"no readable checkpoint left in {self.directory} (tried steps {steps})")
        return None

    def moved_aside(self) -> list[str]:
        """The names of the checkpoints restore_latest has moved aside (STEP.corrupt-TIME), sorted."""
        return sorted(p.name for p in self.directory.glob(f"*{ASIDE}*"))

    def wait(self) -> None:
        """Blocks until the last save is committed; raises CheckpointSaveError if it failed."""
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step, e) from e

    def close(self) -> None:
        """Waits for the last save (raising CheckpointSaveError if it failed) and closes the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()


@dataclasses.dataclass(frozen=True)
class SavedStep:
    """A committed step of a finished run, opened without its train state: the meta and data-iterator state it
    was saved with, and its params read one at a time (orbax partial restore of the `state` item)."""

    directory: pathlib.Path  # WORKDIR/checkpoints
    step: int
    meta: dict
    data_state: dict | None  # None for a step-0 import, which has none

    def check_compatible(self, model_cfg: ModelConfig) -> None:
        """ConfigError naming the differing fields when the step holds another model shape than `model_cfg`."""
        _check_signature(self.meta, model_cfg, self.directory, self.step)

    def read_param(self, name: str, like: jax.ShapeDtypeStruct) -> jax.Array | np.ndarray:
        """Parameter `name`, which must have like.shape: onto like.sharding, or a host array where it has none.
        Nothing else of the state is read; ValueError naming the checkpoint when it cannot be read."""
        state_dir = self.directory / str(self.step) / "state"
        sharding = like.sharding
        how = (
            ocp.RestoreArgs(restore_type=np.ndarray)
            if sharding is None
            else ocp.ArrayRestoreArgs(sharding=sharding)
        )
        args = ocp.args.PyTreeRestore(
            item={"params": {name: 0}}, partial_restore=True, restore_args={"params": {name: how}}
        )
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                array = checkpointer.restore(state_dir, args=args)["params"][name]
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(f"{state_dir}: cannot read parameter {name!r} ({root_cause(e)})") from None
        if not isinstance(
            array, np.ndarray | jax.Array
        ):  # a partial restore leaves a missing name's placeholder
            raise ValueError(f"{state_dir}: cannot read parameter {name!r} (the checkpoint has none)")
        if tuple(array.shape) != tuple(like.shape):
            raise ValueError(
                f"{state_dir}: parameter {name!r} has shape {tuple(array.shape)}, but the model "
                f"needs {tuple(like.shape)}"
            )
        return array

    def read_params(self, abstract: dict[str, jax.ShapeDtypeStruct]) -> dict:
        """The params dict of `abstract`'s names, read one parameter at a time (see read_param)."""
        return {name: self.read_param(name, like) for name, like in abstract.items()}


def read_step(workdir: str | pathlib.Path, step: int | None = None) -> SavedStep:
    """WORKDIR's committed `step` (default: the latest), its meta and data state read in one restore;
    CheckpointMissing naming the workdir when it has no checkpoints/ or no such committed step."""
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointMissing(f"{workdir} has no committed checkpoint (interrupted saves do not count)")
        chosen = ckpt.latest_step() if step is None else step
        if chosen not in steps:
            raise CheckpointMissing(f"{workdir} has no committed checkpoint at step {step}; it has {steps}")
        items = ckpt.manager.restore(
            chosen, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), data=ocp.args.JsonRestore())
        )
    finally:
        ckpt.close()
    return SavedStep(ckpt.directory, chosen, items["meta"], items["data"])
