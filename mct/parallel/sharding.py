"""Device mesh (data, fsdp, expert, tensor) and the one table that maps logical axis names to mesh axes.

Parameters name their axes (`embed`, `vocab`, `heads`, ...) in metadata; activations name theirs at
`constrain` calls. Changing a parallelism layout is an edit of `RULES` or of the mesh sizes in config.
"""

import jax
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from mct.config.run import MESH_AXES, MeshConfig
from mct.errors import ConfigError

# logical axis -> mesh axis (or axes, or None = replicated)
RULES = {
    "batch": ("data", "fsdp", "expert"),  # activations: batch split over every data-parallel axis
    "embed": "fsdp",  # parameters: ZeRO-3 style sharding of the model dimension
    # activations: the residual stream's model dimension between layers (each layer's saved input under remat)
    # is split over tensor, not replicated on it; the layer all-gathers it for its matmuls
    "activation_embed": "tensor",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "expert": "expert",  # MoE: each device holds num_experts / mesh.expert experts
}


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """The (data, fsdp, expert, tensor) mesh over `devices` (default: all), sized by the config.

    Devices of several TPU slices (multislice: DCN between slices) put the data axis across the slices;
    fsdp and tensor stay on one slice's ICI. A physical torus axis is split when a size needs it (tensor=2
    on a 4x4x4 v5p slice), which jax.make_mesh refuses outside v5e.
    """
    devices = jax.devices() if devices is None else devices
    data, fsdp, expert, tensor = mesh_cfg.shape(len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if data % slices:
        raise ConfigError(
            f"config mesh.data={data} must be a multiple of the {slices} slices (data spans them)"
        )
    if slices > 1:
        ici, dcn = (data // slices, fsdp, expert, tensor), (slices, 1, 1, 1)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_device_mesh(
            (data, fsdp, expert, tensor), devices, allow_split_physical_axes=True
        )
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(axes) -> PartitionSpec:
    """The mesh axes of a tuple of logical axis names (None: replicated)."""
    return PartitionSpec(*(RULES[a] if a is not None else None for a in axes))


def state_specs(logical_axes: dict, tx: optax.GradientTransformation, abstract_params: dict) -> dict:
    """PartitionSpecs of the train state {"params", "opt_state"}, both from the params' logical axes: every
    optimizer leaf that mirrors a parameter (Adam's moments) is sharded like it, the rest (counts) replicated."""
    params = jax.tree.map(logical_spec, logical_axes, is_leaf=lambda x: isinstance(x, tuple))
    masked = optax.MaskedNode  # where multi_transform's other groups hold a parameter: no leaf
    opt_state = optax.tree_map_params(
        tx,
        lambda leaf, spec: leaf if isinstance(leaf, masked) else spec,
        jax.eval_shape(tx.init, abstract_params),
        params,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec | masked),
    )
    return {"params": params, "opt_state": opt_state}


def named(mesh: jax.sharding.Mesh, specs):
    """NamedShardings over `mesh` for a tree of PartitionSpecs."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def per_shard(fn, in_axes: tuple, out_axes: tuple):
    """`fn` run on each device's shards (shard_map over the active mesh), arguments and result split by
    logical names: for Pallas kernels, which XLA cannot partition. Unchanged when no mesh is active."""
    if jax.sharding.get_abstract_mesh().empty:
        return fn
    in_specs = tuple(logical_spec(axes) for axes in in_axes)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=logical_spec(out_axes), check_vma=False)


def constrain(x: jax.Array, axes) -> jax.Array:
    """Pins an activation's sharding by logical names; a no-op when no mesh is active (plain calls, tests)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes))


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: what StandardRestore restores onto."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
