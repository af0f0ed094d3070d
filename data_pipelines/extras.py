"""mct's optional dependency groups (pip extras): importing one that is not installed names the extra to install.

The core install trains, prepares the embedded corpus, exports safetensors and decodes; the extras (pyproject.toml)
add the TPU compiler, GGUF and llama.cpp, Apache Beam, the quality classifier and MinHash, PyTorch/transformers
and lm-evaluation-harness.
"""

import importlib
import sys
import types


class MissingExtra(ImportError):
    """An optional dependency is not installed; the one-line message names the extra that brings it."""


def import_extra(module: str, extra: str) -> types.ModuleType:
    """`module`, imported; MissingExtra naming `pip install -e '.[extra]'` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{module} is not installed: it comes with mct's `{extra}` extra (pip install -e '.[{extra}]')"
        ) from None


def exit_without_extra(module: str, extra: str) -> None:
    """For a program whose own module imports `module` at the top: print the one line and exit 2 first."""
    try:
        import_extra(module, extra)
    except MissingExtra as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def beam_prepare_entry() -> None:
    """`mct-beam-prepare`: data_pipelines.beam_prepare's main, or the one line naming the `beam` extra."""
    exit_without_extra("apache_beam", "beam")
    from data_pipelines import beam_prepare

    beam_prepare.main()
