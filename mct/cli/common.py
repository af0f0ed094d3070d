"""What every entry point shares: the platform chosen, config files converted once, and one error convention.

An entry point runs `run(main)`: the project's own errors (`mct.errors.MctError`: bad config, checkpoint, a
locked or unwritable workdir, a diverged run; and `DatasetError`) print one line `error: ...` and exit 2;
anything unexpected keeps its traceback.
"""

import glob
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

from absl import app, flags
from ml_collections import ConfigDict

from data_pipelines.extras import MissingExtra
from data_pipelines.shards import DatasetError
from data_pipelines.tokenizer import TokenizerError
from mct.config.run import Config
from mct.errors import ConfigError, MctError, UserError

USER_ERRORS: tuple[type[BaseException], ...] = (
    MctError,
    DatasetError,
    TokenizerError,
    MissingExtra,
)  # printed as one line, exit 2


def select_platform() -> None:
    """Keeps JAX on the CPU on a machine with neither TPU nor GPU chips (unless JAX_PLATFORMS says otherwise).

    libtpu is installed for ahead-of-time TPU compiles (mct.aot); without this JAX would still initialise a
    TPU backend at its first call there and print warnings. Entry points call it before JAX's first use.
    """
    if "JAX_PLATFORMS" in os.environ or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    if glob.glob("/dev/nvidia[0-9]*"):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already (by the entry's imports): its config read the environment
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def config_from_flag(cd: ConfigDict | None, cls: type[Config] = Config) -> Config:
    """The `cls` (the entry point's run config class) of a `--config` ml_collections file with its overrides
    applied."""
    if cd is None:
        raise ConfigError("no config: pass --config experiments/configs/NAME.py")
    return cls.from_dict(cd.to_dict())


def unknown_override(argv: list[str], cls: type[Config] = Config) -> str | None:
    """The schema's message for the first `--config.a.b=...` override naming no key of `cls`, if any."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        *parents, leaf = arg.removeprefix("--config.").split("=", 1)[0].split(".")
        nested: dict = {leaf: None}
        for key in reversed(parents):
            nested = {key: nested}
        try:
            cls.from_dict(nested)
        except ConfigError as e:
            if str(e).startswith("unknown config key"):
                return str(e)
    return None


def parse_flags(argv: list[str], cls: type[Config] = Config) -> list[str]:
    """absl flag parsing, with a mistyped `--config.a.b=...` override (a key `cls` lacks) as a one-line error."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, ValueError, flags.Error) as e:
        message = unknown_override(argv, cls) or " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run(main: Callable[[list[str]], None], config_class: type[Config] = Config) -> None:
    """app.run(main), printing the project's errors as `error: ...` with exit code 2; `config_class` names the
    keys a `--config.a.b=...` override may set."""

    app.run(lambda argv: guarded(main, argv), flags_parser=lambda argv: parse_flags(argv, config_class))


def guarded(main: Callable[[list[str]], None], argv: list[str]) -> None:
    """main(argv) once the platform is chosen, the project's errors printed as `error: ...` with exit code 2
    (what `run` does after absl parsed the flags; an entry point whose flags are another tool's calls it)."""
    select_platform()
    try:
        main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class Command(NamedTuple):
    """One sub-command of a CLI (`python -m mct.tunnel fit ...`): what runs, and which of the CLI's flags it takes."""

    run: Callable
    required: tuple[str, ...]  # flags it needs
    optional: tuple[str, ...]  # flags it also takes; any other of the CLI's flags is an error
    help: str


def pick_command(prog: str, commands: dict[str, Command], positional: list[str]) -> Command:
    """The command named by the one positional argument, once the flags given are checked against it."""
    names = ", ".join(commands)
    if not positional:
        raise UserError(f"{prog} needs a command (one of {names})")
    name, *extra = positional
    if name not in commands:
        raise UserError(f"unknown command {name!r} (one of {names})")
    if extra:
        raise UserError(f"{prog} {name} takes flags only, not {' '.join(extra)!r}")
    command, own = commands[name], {f for c in commands.values() for f in (*c.required, *c.optional)}
    for flag in sorted(own):
        if flags.FLAGS[flag].present and flag not in (*command.required, *command.optional):
            raise UserError(f"--{flag} is not a flag of {prog} {name}")
    missing = [f"--{flag}" for flag in command.required if not flags.FLAGS[flag].present]
    if missing:
        raise UserError(f"{prog} {name} needs {' and '.join(missing)}")
    return command
