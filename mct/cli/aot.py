"""Compile the train step ahead of time for a Cloud TPU slice, on any machine: does it fit, and what it costs.

python -m mct.aot --config experiments/configs/minicpm4_8b.py --topology v5p-128 [--num_slices N] [--json]
                  [--noestimate] [--rank_remat=full,save_qkv_proj,...] [--config.mesh.fsdp=... any other override]

`mct.train.trainer.build` runs on the abstract devices of the named slice (libtpu describes them; no TPU needed),
then the real TPU compiler compiles `TrainSetup.step_fn` for the abstract state and a batch of ShapeDtypeStructs.
Printed per device: the compiler's argument / output / temporary bytes against the chip's HBM, the compile
time, XLA's FLOP count next to mct.model.flops', and the compiler's estimated step time and MFU (its cost
model, every loop counted: mct.launch.aot.estimated_step_s), also for each --rank_remat policy. Exit 0 when it
fits; 3 and one line `does not fit: ...` when it does not; 2 and one line `error: ...` for bad input or a
compiler rejection (a kernel's name and shape).

Flags and wiring only: `mct.launch.aot` does the work.
"""

import functools
import json
import sys

import jax
from absl import flags
from ml_collections import config_flags

from mct.cli import common as cli
from mct.errors import UserError
from mct.launch.aot import (
    FIT_EXIT,
    accelerator,
    analyze,
    describe_ranking,
    describe_report,
    known_accelerators,
    not_fit_line,
    rank_remat,
)


@functools.cache
def _define_flags() -> None:
    """This CLI's flags, defined when it runs (not on import: mct.train defines --config too)."""
    config_flags.DEFINE_config_file(
        "config", None, "Training config file (ml_collections).", lock_config=True
    )
    flags.DEFINE_string("topology", None, "Cloud TPU accelerator type of one slice, e.g. v5p-128, v5e-8.")
    flags.DEFINE_integer(
        "num_slices", 1, "Slices (multislice over DCN: the data axis spans them).", lower_bound=1
    )
    flags.DEFINE_bool("json", False, "End with one JSON line of the report.")
    flags.DEFINE_bool(
        "estimate", True, "Also the TPU compiler's estimated step time and MFU (3 more, loop-free compiles)."
    )
    flags.DEFINE_list(
        "rank_remat", [], "model.remat policies to rank by estimated step time among those that fit."
    )


def main(argv: list[str]) -> None:
    """Compiles, prints the report; exits 3 with one `does not fit: ...` line when it does not fit."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    jax.config.update("jax_platforms", "cpu")  # AOT targets the topology; this machine's devices are not used
    F = flags.FLAGS
    if not F.topology:
        raise UserError(f"pass --topology, one of {', '.join(known_accelerators())}")
    acc = accelerator(F.topology)
    config = cli.config_from_flag(F.config)
    report = analyze(config, acc, F.num_slices, with_estimate=F.estimate)
    print("\n".join(describe_report(report)))
    if F.rank_remat:
        report["remat_ranking"] = rank_remat(config, acc, F.num_slices, F.rank_remat)
        print("\n".join(describe_ranking(report["remat_ranking"])))
    if not report["fits"]:
        print(not_fit_line(report), file=sys.stderr)
    if F.json:
        print(json.dumps(report))
    if not report["fits"]:
        sys.exit(FIT_EXIT)


def entry() -> None:
    _define_flags()
    cli.run(main)


if __name__ == "__main__":
    entry()
