"""One logical-axis rules table and the mesh it maps onto (t5x / flax partitioning, compact).

Every parameter and activation of the model is annotated with *logical* axis names
(`batch`, `length`, `embed`, `mlp`, `heads`, `kv`, `vocab`). `LOGICAL_AXIS_RULES` maps them onto the
two *mesh* axes of a `Mesh(('data', 'model'))`: data parallelism over `data`, tensor (Megatron-style)
parallelism of the vocabulary, MLP and attention heads over `model`. Every `NamedSharding` of the
project is derived from this one table, so changing the parallelism of a run means changing
`num_partitions` (gin), nothing else.

On a CPU laptop `num_partitions=1` gives a pure data-parallel mesh over the local devices; the tests
force 8 CPU devices and use 8x1 and 4x2 meshes.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# (logical axis, mesh axis or None = replicated). The order matters only for duplicates.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ('batch', 'data'),
    ('vocab', 'model'),
    ('mlp', 'model'),
    ('heads', 'model'),
    ('embed', None),
    ('kv', None),
    ('length', None),
)


@gin.configurable
def create_mesh(num_partitions: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh(('data', 'model'))` of shape [num_devices // num_partitions, num_partitions].

  Args:
    num_partitions: size of the `model` axis (tensor parallelism); 1 = pure data parallelism.
    devices: devices to use (default: all of `jax.devices()`, every host's).

  Raises:
    ValueError: the number of devices is not a multiple of `num_partitions`.
  """
  devices = list(devices if devices is not None else jax.devices())
  if len(devices) % num_partitions:
    raise ValueError(f'{len(devices)} devices cannot be split into model-parallel groups of '
                     f'{num_partitions}')
  grid = np.asarray(devices).reshape(len(devices) // num_partitions, num_partitions)
  return Mesh(grid, ('data', 'model'))


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                     rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """`NamedSharding` of an array whose dimensions carry `logical_axes`, under `rules`."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(logical_axes), rules))


def params_shardings(mesh: Mesh, boxed_tree: Any, rules=LOGICAL_AXIS_RULES) -> Any:
  """Shardings for a pytree of `nn.Partitioned`-boxed (or abstract boxed) parameters.

  Leaves that carry no logical names (scalars, step counters, optimizer counts) are replicated.
  The result has the structure of the *unboxed* tree.
  """
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of a `[batch, ...]` input array: batch over `data`, the rest replicated."""
  return logical_sharding(mesh, ('batch',), rules)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host-local numpy batch on the mesh, split along the batch dimension.

  On one host the host-local batch is the global batch. On several hosts each passes its own
  slice (`jax.process_index()` of `jax.process_count()`) and gets a global array back.

  Raises:
    ValueError: the batch size is not divisible by the `data` axis size.
  """
  sharding = batch_sharding(mesh)
  data_size = mesh.shape['data']
  out = {}
  for k, v in batch.items():
    if (v.shape[0] * jax.process_count()) % data_size:
      raise ValueError(f'batch size {v.shape[0]} (feature {k!r}) is not divisible by the mesh '
                       f"'data' axis ({data_size})")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
