"""Device mesh (data, fsdp, tensor) and the one table that maps logical axis names to mesh axes.

Parameters name their axes (`embed`, `vocab`, `heads`, ...) in metadata; activations name theirs at
`constrain` calls. Changing a parallelism layout is an edit of `RULES` or of the mesh sizes in config.
"""

import math

import jax
import ml_collections
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated)
RULES = {
    "batch": ("data", "fsdp"),  # activations: batch split over every data-parallel axis
    "embed": "fsdp",  # parameters: ZeRO-3 style sharding of the model dimension
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the config keys involved."""


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); at most one may be -1, meaning 'all remaining devices'."""
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or n_devices % known:
        raise ConfigError(
            f"config mesh {dict(zip(MESH_AXES, sizes))} does not fit the {n_devices} available devices"
        )
    sizes = [n_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"config mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices "
            f"but {n_devices} are available (set one axis to -1 to take the rest)"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_spec(axes) -> PartitionSpec:
    return PartitionSpec(*(RULES[a] if a is not None else None for a in axes))


def param_specs(params: nnx.State):
    """PartitionSpecs for a parameter state, from each Param's `logical_axes` metadata."""
    return jax.tree.map(
        lambda v: v.replace(logical_spec(v.get_metadata()["logical_axes"])),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def named(mesh: jax.sharding.Mesh, specs):
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def constrain(x: jax.Array, axes) -> jax.Array:
    """Pins an activation's sharding by logical names; a no-op when no mesh is active (plain calls, tests)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes))
