"""Reads a training run's workdir without building its train state: the committed step, the run config, the
tokenizer, and each parameter by orbax's partial restore, one array at a time, so export and decoding never
restore the optimizer state or hold more than one parameter (and the arrays they keep) in host memory. The
checkpoint is opened once (`mct.run.checkpoint.read_step`); the model's shapes are built only for params.
"""

import functools
import pathlib
from collections.abc import Iterator

import jax
import numpy as np

from data_pipelines.loader import dataset_dir
from data_pipelines.tokenizer import TextTokenizer, has_tokenizer, load_tokenizer
from mct.config.run import Config
from mct.model.decoder import ParamsModel
from mct.run.checkpoint import read_step


class RunCheckpoint:
    """One committed checkpoint of WORKDIR (the latest unless `step` is given): its config, its tokenizer and
    its params, each one call on this reader."""

    def __init__(self, workdir: str | pathlib.Path, step: int | None = None):
        self.workdir = pathlib.Path(workdir)
        self.checkpoint = read_step(
            self.workdir, step
        )  # the meta and data state, for the storage-level reads
        self.step = self.checkpoint.step
        if "config" not in self.checkpoint.meta:
            raise ValueError(f"{workdir} step {self.step}: the checkpoint's meta lacks the run 'config'")
        self.config = Config.from_saved(
            self.checkpoint.meta["config"]
        )  # fields added since it was saved take defaults
        self.model_cfg = self.config.model
        self._last: tuple[str, np.ndarray] | None = None  # the parameter read last (layers are read in turn)

    @functools.cached_property
    def abstract(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The run model's params dict as shapes and dtypes (built on the first parameter read)."""
        return ParamsModel(self.model_cfg).abstract()

    def read(self, name: str, index=()) -> np.ndarray:
        """Parameter `name` (a key of the params dict), or the part `index` selects (e.g. one layer: 3)."""
        if name not in self.abstract:
            raise KeyError(f"unknown parameter {name!r}; the model has {sorted(self.abstract)}")
        if self._last is None or self._last[0] != name:
            self._last = name, self.checkpoint.read_param(name, self.abstract[name])
        return self._last[1][index]

    def read_params(self) -> dict[str, np.ndarray]:
        """Every parameter, as a params dict of host arrays (for decoding, where the model fits in memory)."""
        return self.checkpoint.read_params(self.abstract)

    def tokenizer(self) -> TextTokenizer:
        """The run's tokenizer: the workdir's if present, else its data mixture's; it must be the one the
        checkpoint's data state recorded (a dataset prepared again may hold another)."""
        problems = []
        for directory in self._tokenizer_candidates(problems):
            if not has_tokenizer(directory):
                continue
            tokenizer = load_tokenizer(directory)
            if self.tokenizer_sha256 and tokenizer.fingerprint not in self.tokenizer_sha256:
                problems.append(f"{directory}'s tokenizer is not the one the run was trained with")
                continue
            return tokenizer
        raise FileNotFoundError(
            f"no tokenizer for {self.workdir}: {'; '.join(problems) or 'none found'}; pass a "
            "tokenizer explicitly"
        )

    @property
    def tokenizer_sha256(self) -> set[str]:
        """The hashes of the tokenizers the run's data was prepared with (none for an imported run, which has
        no data state)."""
        mixture = (self.checkpoint.data_state or {}).get("fingerprint", {}).get("mixture", {})
        return {c["tokenizer_sha256"] for c in mixture.values() if "tokenizer_sha256" in c}

    def _tokenizer_candidates(self, problems: list[str]) -> Iterator[pathlib.Path]:
        """WORKDIR (mct.import_hf puts the tokenizer there), then each mixture dataset, looked up only when the
        ones before do not fit; a dataset that cannot be found is added to `problems`."""
        yield self.workdir
        data = self.config.data
        for name, component in sorted(data.mixture.items()):
            try:
                directory = dataset_dir(component.path, cache_dir=data.cache_dir, vocab_size=data.vocab_size)
            except (OSError, ValueError) as e:
                problems.append(f"mixture component {name!r}: {e}")
                continue
            yield directory
