"""mct: MiniCPM-style pre-training, tuning and export in JAX/Flax (docs/design.md is the map)."""

import glob
import os
import sys

# libtpu is installed for ahead-of-time TPU compiles (mct.aot); on a machine with neither TPU nor GPU chips it
# would still initialise a TPU backend at the first JAX call and print warnings: keep JAX on the CPU there.
if "JAX_PLATFORMS" not in os.environ and not (
    glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*")
):
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported first (e.g. by grain): its config read the environment already
        sys.modules["jax"].config.update("jax_platforms", "cpu")
