"""Imports a Hugging Face Llama- or MiniCPM-layout safetensors checkpoint as an mct workdir that mct.train
continues from (step 0, fresh optimizer state, fresh data iterator).

    python -m mct.import_hf --hf_dir DIR --out WORKDIR [--unfold_mup] [--config experiments/configs/x.py]

A MiniCPM directory as OpenBMB publishes it (MiniCPM4-0.5B, -8B: no model_type, sparse_config in OpenBMB's top-k
convention) imports as is; a config field mct would not compute exactly is refused by name (docs/design.md, "The
MiniCPM release format"). The model shape comes from config.json; everything else (optimizer, schedule, data)
from --config (default: experiments/configs/base.py), whose optimizer the saved state is built for. A Llama layout
reads as a scale-free model unless --unfold_mup restores the muP scales recorded at export. Exporting the result
again in the same layout reproduces the input files bit for bit. A ternary export (mct.export --format ternary)
reads back as its dequantised weights, a model with model.quant.weights = "none" (docs/bitcpm.md).

Flags and wiring only: `mct.export.hf_import` does the work.
"""

import pathlib
import shlex

from absl import flags
from ml_collections import config_flags

from mct.cli import common as cli
from mct.config.run import Config
from mct.config.schema import to_dict
from mct.errors import UserError
from mct.export.hf_import import import_hf
from mct.run.reader import RunCheckpoint


def _define_flags() -> None:
    flags.DEFINE_string("hf_dir", None, "HF model directory (config.json + safetensors).", required=True)
    flags.DEFINE_string("out", None, "New (or empty) mct workdir to write.", required=True)
    flags.DEFINE_bool("unfold_mup", False, "Llama layout: restore the muP scales folded in at export.")
    config_flags.DEFINE_config_file("config", None, "Training config the workdir is meant for.")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"a.b": leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def train_command(config_file: str, workdir: pathlib.Path, base: Config) -> str:
    """The mct.train command that continues an imported workdir: the config file plus the imported model's
    fields where they differ from the file's (the checkpoint holds that model)."""
    imported = RunCheckpoint(workdir).model_cfg
    want, have = _flat(to_dict(imported)), _flat(to_dict(base.model))
    overrides = [
        f"--config.model.{k}={shlex.quote(str(tuple(v) if isinstance(v, list) else v))}"
        for k, v in want.items()
        if have.get(k) != v
    ]
    return " ".join(["python -m mct.train --config", config_file, f"--config.workdir={workdir}", *overrides])


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    config_file = config_flags.get_config_filename(f["config"]) if f.config else "experiments/configs/base.py"
    config = cli.config_from_flag(f.config) if f.config else Config()
    try:
        out = import_hf(f.hf_dir, f.out, unfold_mup=f.unfold_mup, config=config)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    print(
        f"imported {f.hf_dir} into {out} (step 0); train on with:\n  {train_command(config_file, out, config)}"
    )


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
