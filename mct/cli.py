"""What every entry point shares: config files converted once at the boundary, and one error convention.

An entry point runs `cli.run(main)`: the project's own errors (bad config, data, checkpoint, a locked or
unwritable workdir) print one line `error: ...` and exit 2; anything unexpected keeps its traceback.
"""

import sys
from collections.abc import Callable

from absl import app, flags
from ml_collections import ConfigDict

from data_pipelines.shards import DatasetError
from mct.config import Config, ConfigError


class UserError(ValueError):
    """Bad input that is not a config key: a missing file, an out-of-range flag; printed as one line."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DatasetError, UserError)


def register_errors(*types: type[BaseException]) -> None:
    """Adds error types (defined by modules cli cannot import) that entry points print as one line."""
    global USER_ERRORS
    USER_ERRORS = (*USER_ERRORS, *types)


def config_from_flag(cd: ConfigDict | None) -> Config:
    """The Config of a `--config` ml_collections file with its overrides applied."""
    if cd is None:
        raise ConfigError("no config: pass --config experiments/configs/NAME.py")
    return Config.from_dict(cd.to_dict())


def unknown_override(argv: list[str]) -> str | None:
    """The schema's message for the first `--config.a.b=...` override naming no config key, if any."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        *parents, leaf = arg.removeprefix("--config.").split("=", 1)[0].split(".")
        nested: dict = {leaf: None}
        for key in reversed(parents):
            nested = {key: nested}
        try:
            Config.from_dict(nested)
        except ConfigError as e:
            if str(e).startswith("unknown config key"):
                return str(e)
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a mistyped `--config.a.b=...` override as a one-line error."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, ValueError, flags.Error) as e:
        message = unknown_override(argv) or " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run(main: Callable[[list[str]], None]) -> None:
    """app.run(main), printing the project's errors as `error: ...` with exit code 2."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded, flags_parser=_parse_flags)
