"""The device mesh and shardings of the data-parallel step.

ssl_jax is data-parallel: one mesh axis, 'data', over every device of every
process. Arrays of the batch are sharded along their first axis; parameters
and optimiser state are replicated. The mesh uses Auto axes, so the step is
written as if for one device over the global batch and XLA inserts the
collectives (JAX >= 0.9 defaults `jax.make_mesh` to Explicit axes, under
which every cross-device contraction would need an explicit out_sharding).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D Auto mesh named 'data' over the first `num_devices` (default all)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f'num_devices must be in [1, {len(devices)}], got {num_devices}.')
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: jax.sharding.Mesh | None = None, *,
                          device_count: int | None = None) -> None:
  """Raises ValueError unless the global batch splits evenly over devices and processes.

  device_count: the devices of a run not started yet (a dry run's devices
  per process times its processes), instead of the mesh's.
  """
  devices = device_count or (mesh.size if mesh is not None else jax.device_count())
  if global_batch <= 0 or global_batch % devices:
    raise ValueError(
        f'The global batch size {global_batch} must be a positive multiple of the '
        f'device count {devices}; set --config.data.batch_size to a multiple of '
        f'{devices} (e.g. {max(devices, (global_batch // devices) * devices or devices)}).')
  if global_batch % jax.process_count():
    raise ValueError(f'The global batch size {global_batch} must be divisible by the '
                     f'process count {jax.process_count()}.')
