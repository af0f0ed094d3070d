"""Sparse upcycling (MiniCPM paper section 7, MiniCPM-MoE): a dense run's checkpoint becomes step 0 of an MoE run.

    python -m mct.upcycle --from DENSE_WORKDIR [--step N] --out MOE_WORKDIR --config experiments/configs/X.py

Flags and wiring only: `mct.run.upcycle` does the work.
"""

from absl import flags, logging
from ml_collections import config_flags

from mct.cli import common as cli
from mct.errors import UserError
from mct.run.upcycle import upcycle


def _define_flags() -> None:
    flags.DEFINE_string("from", None, "Dense training workdir to upcycle.", required=True)
    flags.DEFINE_integer(
        "step", None, "Its checkpoint step (default: the latest; MiniCPM: a stable-phase one)."
    )
    flags.DEFINE_string("out", None, "New (or empty) workdir of the MoE run.", required=True)
    config_flags.DEFINE_config_file("config", None, "The MoE run's config (model.moe.num_experts > 0).")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax's save chatter
    f = flags.FLAGS
    if not f.config:
        raise UserError("upcycle: pass --config (the MoE run's config file)")
    config = cli.config_from_flag(f.config)
    try:
        out = upcycle(f["from"].value, f.step, f.out, config)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    experts = config.model.moe.num_experts
    print(
        f"upcycled {f['from'].value} into {out} (step 0, {experts} experts, top-{config.model.moe.top_k}); "
        f"train on with: python -m mct.train --config ... --config.workdir={out}"
    )


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
