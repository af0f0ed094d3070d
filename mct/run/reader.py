"""Reads a training run's workdir without building its train state: the committed step, the run config, the
tokenizer, and each parameter by orbax's partial restore, one array at a time, so export and decoding never
restore the optimizer state or hold more than one parameter (and the arrays they keep) in host memory.
"""

import pathlib

import numpy as np
import orbax.checkpoint as ocp
from tokenizers import Tokenizer

from data_pipelines.loader import dataset_dir
from data_pipelines.shards import TOKENIZER
from data_pipelines.tokenizer import read_tokenizer_file, sha256_hex
from mct.config.run import Config
from mct.model.decoder import ParamsModel
from mct.run.checkpoint import Checkpointer


class RunCheckpoint:
    """One committed checkpoint of WORKDIR (the latest unless `step` is given), read one array at a time."""

    def __init__(self, workdir: str | pathlib.Path, step: int | None = None):
        self.workdir = pathlib.Path(workdir)
        if not (self.workdir / "checkpoints").is_dir():
            raise FileNotFoundError(f"{workdir} is not a training workdir: it has no checkpoints/ directory")
        ckpt = Checkpointer(str(self.workdir), read_only=True)
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir} has no committed checkpoint (interrupted saves do not count)")
        self.step = ckpt.latest_step() if step is None else step
        if self.step not in steps:
            raise FileNotFoundError(f"{workdir} has no committed checkpoint at step {step}; it has {steps}")
        meta = ckpt.read_meta(self.step)
        data_state = ckpt.manager.restore(self.step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
            "data"
        ]
        ckpt.close()
        if "config" not in meta:
            raise ValueError(f"{workdir} step {self.step}: the checkpoint's meta lacks the run 'config'")
        self.config = Config.from_saved(meta["config"])  # fields added since it was saved take defaults
        self.model_cfg = self.config.model
        # The tokenizers the run's data was prepared with (none for an imported run, which has no data state).
        mixture = (data_state or {}).get("fingerprint", {}).get("mixture", {})
        self.tokenizer_sha256 = {c["tokenizer_sha256"] for c in mixture.values() if "tokenizer_sha256" in c}
        self.shapes = {name: x.shape for name, x in ParamsModel(self.model_cfg).abstract().items()}
        self._state_dir = self.workdir.absolute() / "checkpoints" / str(self.step) / "state"
        self._last: tuple[str, np.ndarray] | None = None  # the parameter read last (layers are read in turn)

    def read(self, name: str, index=()) -> np.ndarray:
        """Parameter `name` (a key of the params dict), or the part `index` selects (e.g. one layer: 3)."""
        if name not in self.shapes:
            raise KeyError(f"unknown parameter {name!r}; the model has {sorted(self.shapes)}")
        if self._last is None or self._last[0] != name:
            self._last = name, self._restore(name)
        return self._last[1][index]

    def read_params(self) -> dict[str, np.ndarray]:
        """Every parameter, as a params dict of host arrays (for decoding, where the model fits in memory)."""
        return {name: self._restore(name) for name in self.shapes}

    def _restore(self, name: str) -> np.ndarray:
        """One parameter of the checkpoint's `state` item, as a host array (orbax partial restore)."""
        args = ocp.args.PyTreeRestore(
            item={"params": {name: 0}}, partial_restore=True,
            restore_args={"params": {name: ocp.RestoreArgs(restore_type=np.ndarray)}},
        )  # fmt: skip
        try:
            with ocp.PyTreeCheckpointer() as checkpointer:
                array = checkpointer.restore(self._state_dir, args=args)["params"][name]
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(
                f"{self._state_dir}: cannot read parameter {name!r} ({str(e).splitlines()[0]})"
            ) from None
        if tuple(array.shape) != tuple(self.shapes[name]):
            raise ValueError(
                f"{self._state_dir}: parameter {name!r} has shape {tuple(array.shape)}, but the run config's "
                f"model needs {tuple(self.shapes[name])}"
            )
        return array


def load_run_tokenizer(run: RunCheckpoint) -> Tokenizer:
    """The run's tokenizer: WORKDIR/tokenizer.json if present, else its data mixture's; it must be the one
    the checkpoint's data state recorded (a dataset prepared again may hold another)."""
    candidates = [run.workdir / TOKENIZER]  # mct.import_hf puts the tokenizer there
    problems = []
    data = run.config.data
    for name, component in sorted(data.mixture.items()):
        try:
            candidates.append(
                dataset_dir(component.path, cache_dir=data.cache_dir, vocab_size=data.vocab_size) / TOKENIZER
            )
        except (OSError, ValueError) as e:
            problems.append(f"mixture component {name!r}: {e}")
    for path in candidates:
        if not path.is_file():
            continue
        if run.tokenizer_sha256 and sha256_hex(path.read_bytes()) not in run.tokenizer_sha256:
            problems.append(f"{path} is not the tokenizer the run was trained with")
            continue
        return read_tokenizer_file(path)
    raise FileNotFoundError(
        f"no tokenizer for {run.workdir}: {'; '.join(problems) or 'none found'}; pass a tokenizer.json explicitly"
    )
