"""The project's error types: bad input or a run that cannot go on, each with a one-line message.

Library code raises them; only the entry points (`mct.cli`) catch them, print `error: <message>` and exit 2.
Anything else is a bug and keeps its traceback.
"""


class MctError(Exception):
    """Base of every error an entry point prints as one line with exit code 2."""


class UserError(MctError, ValueError):
    """Bad input that is not a config key: a missing file, an out-of-range flag."""


class ConfigError(MctError, ValueError):
    """A configuration that cannot run; the message names the config keys involved."""


class CheckpointMissing(MctError, FileNotFoundError):
    """No (readable) checkpoint where one is needed: the workdir, step or directory is named."""


class CheckpointSaveError(MctError, RuntimeError):
    """A checkpoint save failed: the run must stop. One line: the step, the root cause, the last good step."""


class WorkdirLocked(MctError, ValueError):
    """Another live trainer holds the workdir; the one-line message names it (pid, host, since when)."""


class TrainingDiverged(MctError, RuntimeError):
    """Too many consecutive non-finite steps; the workdir keeps its last good checkpoint."""


class CompileError(MctError):
    """The TPU compiler (or Pallas' TPU lowering) rejected the step; one line, naming the kernel if one failed."""
