"""Accelerator slices by name: chips, hosts, the JAX install they need, and vendor peak figures.

Pure Python (no jax import), so that the launcher's own small environment (`xm_launch/`) and the
compute estimates (`rest_jax/compute.py`) read the same table.

Names accepted by `parse`:

| name            | what                                               | chips | hosts |
|-----------------|----------------------------------------------------|-------|-------|
| `v5litepod-8`   | Cloud TPU v5e slice; the number counts chips       | 8     | 1     |
| `v5e-8`         | the same (the short name)                          | 8     | 1     |
| `v4-32`         | Cloud TPU v4 slice; the number counts TensorCores  | 16    | 4     |
| `v5p-8`         | Cloud TPU v5p slice; the number counts TensorCores | 4     | 1     |
| `a100=8`        | NVIDIA A100 SXM4 80 GB GPUs (`a100x8` too)          | 8     | 1     |
| `h100=16`       | NVIDIA H100 SXM5 80 GB GPUs, 8 per host            | 16    | 2     |
| `cpu`           | this machine's CPU (local runs)                    | 1     | 1     |

TPU v4 and v5p have two TensorCores per chip (megacore), so `v4-32` is 16 chips; v5e has one, so
`v5litepod-8` is 8 chips (Cloud TPU docs, "TPU versions"). Hosts: v4 and v5p have 4 chips per
host; v5e slices of up to 8 chips are one host, larger ones 4 chips per host (Cloud TPU v5e docs:
machine types ct5lp-hightpu-1t/4t/8t); GPU hosts have 8 GPUs (our choice: the A3 / A2 shapes).
"""

from __future__ import annotations

import dataclasses
import math
import re

# Vendor figures per chip (dense, no sparsity): peak bf16 FLOP/s, HBM bandwidth (bytes/s), HBM
# capacity (bytes). Sources:
#   tpu_v4:  Cloud TPU docs "TPU v4": 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s per chip.
#   tpu_v5e: Cloud TPU docs "TPU v5e": 197 TFLOP/s bf16, 16 GiB HBM2 at 819 GB/s per chip.
#   tpu_v5p: Cloud TPU docs "TPU v5p": 459 TFLOP/s bf16, 95 GiB HBM2e at 2,765 GB/s per chip.
#   a100:    NVIDIA A100 datasheet (SXM4 80 GB): 312 TFLOP/s bf16 tensor core (624 with
#            sparsity), 2,039 GB/s HBM2e.
#   h100:    NVIDIA H100 datasheet (SXM5 80 GB): 989 TFLOP/s bf16 tensor core (1,979 with
#            sparsity), 3.35 TB/s HBM3.
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  kind: str                 # 'tpu' | 'gpu' | 'cpu'
  peak_bf16_flops: float    # FLOP/s per chip, dense.
  hbm_bandwidth: float      # bytes/s per chip.
  hbm_bytes: float          # bytes per chip.
  source: str               # where the figures come from.


CHIPS = {
    'tpu_v4': Chip('tpu_v4', 'tpu', 275e12, 1200e9, 32 * GIB, 'Cloud TPU docs, TPU v4'),
    'tpu_v5e': Chip('tpu_v5e', 'tpu', 197e12, 819e9, 16 * GIB, 'Cloud TPU docs, TPU v5e'),
    'tpu_v5p': Chip('tpu_v5p', 'tpu', 459e12, 2765e9, 95 * GIB, 'Cloud TPU docs, TPU v5p'),
    'a100': Chip('a100', 'gpu', 312e12, 2039e9, 80e9, 'NVIDIA A100 datasheet, SXM4 80 GB'),
    'h100': Chip('h100', 'gpu', 989e12, 3350e9, 80e9, 'NVIDIA H100 datasheet, SXM5 80 GB'),
    # Not a vendor figure: a placeholder so that `cpu` parses (local runs); no estimates on it.
    'cpu': Chip('cpu', 'cpu', float('nan'), float('nan'), float('nan'), 'none (local runs)'),
}

# ICI topologies of the usual slice sizes (chips -> topology; Cloud TPU docs' tables): v5e is a 2D
# torus, v4 and v5p 3D. A size not listed has no topology here (XManager then gets the chip count).
_TOPOLOGY_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16',
                256: '16x16'}
_TOPOLOGY_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8',
                256: '4x8x8', 512: '8x8x8'}
# Chip -> the name of its `xm.ResourceType` (xmanager 0.8.5): the A100 figures are the 80 GB part's.
XM_RESOURCE = {'tpu_v4': 'tpu_v4', 'tpu_v5e': 'tpu_v5e', 'tpu_v5p': 'tpu_v5p',
               'a100': 'a100_80gib', 'h100': 'h100', 'cpu': None}
# TPU slice prefix -> (chip, TensorCores per chip, chips per host of a multi-host slice).
_TPU_PREFIXES = {'v4': ('tpu_v4', 2, 4), 'v5p': ('tpu_v5p', 2, 4),
                 'v5litepod': ('tpu_v5e', 1, 4), 'v5e': ('tpu_v5e', 1, 4)}
_GPU_NAMES = {'a100': 'a100', 'h100': 'h100'}
GPUS_PER_HOST = 8
# The JAX install of each kind (pip extras of the same jax version as constraints.txt).
JAX_EXTRA = {'tpu': 'tpu', 'gpu': 'cuda12', 'cpu': None}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A parsed slice. `name` is the canonical name (`v5litepod-8`, `v4-32`, `a100=8`)."""
  name: str
  chip: Chip
  num_chips: int
  num_hosts: int

  @property
  def kind(self) -> str:
    return self.chip.kind

  @property
  def chips_per_host(self) -> int:
    return self.num_chips // self.num_hosts

  @property
  def topology(self) -> str | None:
    """The TPU slice's ICI topology ('2x4', '2x2x4'), None for GPUs or an unlisted size."""
    if self.kind != 'tpu':
      return None
    table = _TOPOLOGY_2D if self.chip.name == 'tpu_v5e' else _TOPOLOGY_3D
    return table.get(self.num_chips)

  @property
  def xm_resource(self) -> str | None:
    """The `xm.JobRequirements` keyword of the chip ('tpu_v5e', 'a100_80gib'; None: CPU)."""
    return XM_RESOURCE[self.chip.name]

  @property
  def jax_extra(self) -> str | None:
    """The pip extra of jax for this hardware: 'tpu', 'cuda12' or None (plain CPU jax)."""
    return JAX_EXTRA[self.kind]

  def to_json(self) -> dict:
    return {'name': self.name, 'kind': self.kind, 'chip': self.chip.name,
            'num_chips': self.num_chips, 'num_hosts': self.num_hosts,
            'chips_per_host': self.chips_per_host, 'topology': self.topology,
            'xm_resource': self.xm_resource, 'jax_extra': self.jax_extra}


def parse(spec: str) -> Accelerator:
  """'v5litepod-8' | 'v5e-8' | 'v4-32' | 'v5p-8' | 'a100=8' | 'a100x8' | 'h100=16' | 'cpu'.

  Raises:
    ValueError: an unknown name, a count that is not a positive integer, a TPU TensorCore count
      that is not a whole number of chips, or a multi-host slice whose chips do not split evenly
      over its hosts.
  """
  s = spec.strip().lower()
  if s == 'cpu':
    return Accelerator('cpu', CHIPS['cpu'], 1, 1)
  m = re.fullmatch(r'(v4|v5p|v5litepod|v5e)-(\d+)', s)
  if m:
    prefix, count = m.group(1), int(m.group(2))
    chip, cores_per_chip, per_host = _TPU_PREFIXES[prefix]
    if count < 1 or count % cores_per_chip:
      raise ValueError(f'{spec!r}: {prefix} slices are named by TensorCores, {cores_per_chip} '
                       'per chip: the number must be a positive multiple of '
                       f'{cores_per_chip}')
    chips = count // cores_per_chip
    single_host = 8 if prefix in ('v5litepod', 'v5e') else per_host
    hosts = 1 if chips <= single_host else math.ceil(chips / per_host)
    if chips % hosts:
      raise ValueError(f'{spec!r}: {chips} chips do not split over {hosts} hosts')
    canonical = f'v5litepod-{count}' if prefix == 'v5e' else s
    return Accelerator(canonical, CHIPS[chip], chips, hosts)
  m = re.fullmatch(r'([a-z0-9]+)\s*[=x]\s*(\d+)', s)
  if m and m.group(1) in _GPU_NAMES:
    count = int(m.group(2))
    if count < 1:
      raise ValueError(f'{spec!r}: the GPU count must be >= 1')
    hosts = math.ceil(count / GPUS_PER_HOST)
    if hosts > 1 and count % GPUS_PER_HOST:
      raise ValueError(f'{spec!r}: {count} GPUs do not fill hosts of {GPUS_PER_HOST}')
    return Accelerator(f'{m.group(1)}={count}', CHIPS[_GPU_NAMES[m.group(1)]], count, hosts)
  raise ValueError(f'unknown accelerator {spec!r}: use a TPU slice (v5litepod-8, v4-32, v5p-8) '
                   'or GPUs (a100=8, h100=8), or cpu')
