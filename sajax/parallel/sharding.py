"""Device mesh, logical-axis rules and the NamedShardings of params, optimizer state and batches.

The mesh has three axes:
  data    pure data parallelism: params replicated, batch split
  fsdp    data parallelism with params (and optimizer state) split along their `embed` axis, gathered per layer
  tensor  Megatron-style tensor parallelism: heads, MLP width and vocab split
Sizes come from config; -1 means "all remaining devices". The same code runs on 1 CPU device (every axis 1), on
8 fake CPU devices, on GPUs and on TPU pods (multi-host: `jax.devices()` is global).
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name → mesh axis (or axes, or None = replicated). Read top to bottom.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
    ("lora_rank", None),  # LoRA adapters: split along their base weight's other axes
    # activations
    ("batch", BATCH_AXES),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def mesh_shape(data: int, fsdp: int, tensor: int, device_count: int) -> tuple[int, int, int]:
    """The (data, fsdp, tensor) sizes over `device_count` devices; at most one may be -1 (all remaining)."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    unknown = [name for name, size in sizes.items() if size == -1]
    for name, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"mesh.{name} must be a positive integer or -1, got {size!r}")
    if len(unknown) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {unknown}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if unknown:
        if device_count % known:
            raise ValueError(f"mesh {sizes}: {device_count} devices are not divisible by {known}")
        sizes[unknown[0]] = device_count // known
    shape = tuple(sizes[name] for name in MESH_AXES)
    if math.prod(shape) != device_count:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"{device_count} are available")
    return shape


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None,
              arrange: bool = False) -> Mesh:
    """Mesh of shape (data, fsdp, tensor) over `devices` (default: all, in jax's topology-aware order). Given
    devices keep their order, unless `arrange` (the devices of a TPU topology: laid out by the interconnect)."""
    shape = mesh_shape(data, fsdp, tensor, len(jax.devices() if devices is None else devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices is None or arrange:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)  # topology-aware (TPU/GPU)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Tree of logical `PartitionSpec`s → tree of `NamedSharding`s on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(shapes, shardings) -> None:
    """Every sharded dimension must be a multiple of the product of its mesh axis sizes."""
    for (path, shape), sharding in zip(jax.tree_util.tree_flatten_with_path(shapes)[0],
                                       jax.tree.leaves(shardings)):
        for dim, (size, axes) in enumerate(zip(shape.shape, sharding.spec)):
            axes = (axes,) if isinstance(axes, str) else (axes or ())
            ways = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % ways:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise ValueError(f"parameter {name} dim {dim} has size {size}, not divisible by mesh axes "
                                 f"{axes} of total size {ways}; change the mesh or the model size")


def opt_state_shardings(tx: optax.GradientTransformation, params_abstract, params_sharding, mesh: Mesh):
    """NamedShardings for `tx.init(params)`: per-parameter state of the parameter's shape (Adam moments, ...)
    shares its parameter's sharding; other per-parameter state (e.g. Adafactor's factored rows and columns) and
    everything else (step counts, scalars) is replicated."""
    state_abstract = jax.eval_shape(tx.init, params_abstract)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx, lambda leaf, sharding, param: sharding if leaf.shape == param.shape else replicated,
        state_abstract, params_sharding, params_abstract, transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis split over data × fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many blocks `batch_sharding` splits the batch into: the product of the BATCH_AXES sizes."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_micro_batch(micro_batch: int, mesh: Mesh) -> None:
    """ValueError unless a micro-batch of `micro_batch` groups splits evenly over the mesh's batch shards."""
    if micro_batch % batch_shards(mesh):
        raise ValueError(f"train.batch_size / grad_accum_steps = {micro_batch} groups must be divisible by "
                         f"mesh data × fsdp = {batch_shards(mesh)}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Activates the model's activation-sharding hints while tracing: `with activation_rules(mesh): jit(...)`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
