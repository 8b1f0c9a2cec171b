"""Multi-host runs on JAX's own runtime (`jax.distributed`), and what each host feeds and fetches.

A multi-host job runs the same `rest-jax` command on every host. With `--distributed` (or the
environment variable `REST_JAX_DISTRIBUTED=1`, which the launcher `xm_launch/` sets on multi-host
slices, as big_vision's launch does) every command first calls `initialize`, i.e.
`jax.distributed.initialize`: on Cloud TPU, SLURM and Kubernetes JAX finds the coordinator,
process count and process id itself; elsewhere they come from `--coordinator_address`,
`--num_processes` and `--process_id` (the tests run two local CPU processes on a loopback port;
gloo collectives are the CPU default). After it, `jax.devices()` spans every host.

What runs where (our choice, stated once here):

* **Training** (BC, Improve, reward-model training) is one global program: the mesh spans all
  devices, every host computes the same global batch plan (`data.ArrayBatcher.batch_at`, a pure
  function of the step) and feeds only its own rows of it (`host_rows`: the rows that the batch
  sharding places on this host's devices), so P hosts train on one global batch, not on P copies
  of it. Checkpoints are saved collectively by orbax (every host calls save); files of our own
  (summaries, settings) are written by host 0 only (`is_writer`).
* **Decoding for evaluation** (dev / test BLEU, pass@k) runs on every host with a host-local copy
  of the params (`host_local`), each host decoding the whole (small) split: no collective in the
  decode loop, and every host gets the same metrics.
* **Grow and scoring** are host-local too, and share their chunks through the work directory
  (`records.claim_chunks`), the same way independent single-host worker processes do.

Every host takes the same barriers: `barrier(name)` is a no-op on one host.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from rest_jax import partitioning

DISTRIBUTED_ENV = 'REST_JAX_DISTRIBUTED'  # '1': call `jax.distributed.initialize` (xm_launch).


def requested(flag: bool = False) -> bool:
  """Whether this process should join a multi-host job: `flag` or `$REST_JAX_DISTRIBUTED`."""
  return bool(flag) or os.environ.get(DISTRIBUTED_ENV, '').lower() in ('1', 'true', 'yes')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """`jax.distributed.initialize` with the given arguments (None: JAX auto-detects them).

  Must run before any JAX computation. Idempotent (a second call is a no-op).

  Raises:
    RuntimeError / ValueError: from JAX, e.g. no coordinator reachable or nothing to detect.
  """
  if jax.distributed.is_initialized():
    return
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address,
                                  num_processes=num_processes, process_id=process_id).items()
            if v is not None}
  jax.distributed.initialize(**kwargs)
  logging.info('distributed: process %d of %d, %d of %d devices local', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_writer() -> bool:
  """Whether this host writes the job's own files (host 0; always true on one host)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every host has reached `name` (no-op on one host)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def host_rows(global_batch_size: int, mesh) -> slice:
  """The rows of a `[global_batch_size, ...]` batch that this host feeds on `mesh`.

  They are the rows that `partitioning.batch_sharding(mesh)` places on this host's devices: all
  of them on one host, a contiguous 1/P of them for P hosts (a mesh built by
  `partitioning.create_mesh` from `jax.devices()`, which lists each host's devices together).

  Raises:
    ValueError: the batch does not divide over the mesh's `data` axis, or this host's rows are
      not contiguous (a mesh whose device order interleaves hosts).
  """
  if global_batch_size % mesh.shape['data']:
    raise ValueError(f"global batch {global_batch_size} is not divisible by the mesh 'data' "
                     f"axis ({mesh.shape['data']})")
  index = partitioning.batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  spans = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                  for s in index.values()})
  lo, hi = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError(f'this host holds rows {spans} of the batch: not one contiguous range '
                     '(build the mesh with partitioning.create_mesh)')
  return slice(lo, hi)


def host_local(tree: Any) -> Any:
  """`tree` with every array that spans other hosts replaced by a full host-local numpy copy.

  One host: `tree` unchanged. Several hosts: each non-fully-addressable `jax.Array` is gathered
  (`multihost_utils.process_allgather`, a collective: every host must call this with the same
  tree), so decoding can then run on this host alone.
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  leaves, treedef = jax.tree.flatten(tree)
  spans = [isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves]
  gathered = iter(multihost_utils.process_allgather(
      [x for x, s in zip(leaves, spans) if s], tiled=True))
  return jax.tree.unflatten(treedef, [np.asarray(next(gathered)) if s else x
                                      for x, s in zip(leaves, spans)])
