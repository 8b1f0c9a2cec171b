"""The launcher's pure logic: the job's command line, image set-up and spec, without xmanager.

`launch.py` turns the spec into XManager objects; this module needs only the standard library
(and `rest_jax/accelerators.py`, itself pure Python), so the main test suite tests it
(tests/test_launch.py) and `launch.py --dry_run` prints it with no cloud library imported.

A job runs the same command on every host:

    rest-jax <mode> --gin_file=<f> ... --workdir=<URL> [--gin.NAME=VALUE ...]

inside a container built from `base_image` with the project's pinned requirements, the JAX build
of the accelerator (`jax[tpu]` or `jax[cuda12]`, same version as constraints.txt) and the project
itself. A multi-host slice gets `DISTRIBUTED_ENV=1` in its environment (the switch by which every
`rest-jax` command initialises `jax.distributed`; JAX auto-detects the coordinator on Cloud TPU).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Any, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # rest_jax/accelerators.py; its package __init__ imports nothing.
  sys.path.insert(0, ROOT)
from rest_jax import accelerators  # noqa: E402

# Run mode -> (the `rest-jax` subcommand, its default run config).
MODES = {
    'train': ('train', 'gin_configs/runs/train_bc.gin'),
    'grow': ('grow', 'gin_configs/runs/grow.gin'),
    'score': ('score', 'gin_configs/runs/score.gin'),
    'improve': ('improve', 'gin_configs/runs/improve.gin'),
    'rest': ('rest', 'gin_configs/runs/rest_iwslt14_de_en.gin'),
    'rest-em': ('rest-em', 'gin_configs/runs/rest_em_gsm8k.gin'),
    'online': ('online', 'gin_configs/runs/ppo_iwslt14_de_en.gin'),  # One host only.
}
# The environment variable that asks every `rest-jax` command to call `jax.distributed.initialize`
# (`rest_jax.distributed.DISTRIBUTED_ENV`, which imports jax: not importable here; tests check that
# the two are equal). Set on multi-host slices.
DISTRIBUTED_ENV = 'REST_JAX_DISTRIBUTED'
BASE_IMAGE = 'python:3.11'  # Our choice for TPU and GPU: jax's pip wheels bring CUDA themselves.
_URL = re.compile(r'^[a-z][a-z0-9+.-]*://')


def jax_version(constraints: str = os.path.join(ROOT, 'constraints.txt')) -> str:
  """The `jax==X` pin of constraints.txt (the image installs the same version).

  Raises:
    ValueError: no jax pin in the file.
  """
  with open(constraints) as f:
    for line in f:
      m = re.fullmatch(r'jax==(\S+)', line.split('#')[0].strip())
      if m:
        return m.group(1)
  raise ValueError(f'{constraints}: no jax== pin')


def resolve_gin_file(name: str) -> str:
  """`name` as the repository-relative path `rest-jax` will find (it searches the repository
  root and gin_configs/, as `main.parse_gin` does).

  Raises:
    ValueError: the file is in neither place.
  """
  for prefix in ('', 'gin_configs'):
    path = os.path.normpath(os.path.join(prefix, name))
    if os.path.isfile(os.path.join(ROOT, path)):
      return path
  raise ValueError(f'gin file {name!r} not found under {ROOT} or {ROOT}/gin_configs')


def job_args(mode: str, gin_files: Sequence[str], workdir: str,
             extra: Sequence[str] = ()) -> list[str]:
  """The `rest-jax` argv of the job (the same on every host).

  Args:
    mode: a key of `MODES`.
    gin_files: run configs (repository-relative; none: the mode's default).
    workdir: the work directory, a URL for cloud jobs (`gs://bucket/run`).
    extra: further `rest-jax` flags, e.g. `--gin.train.batch_size=512`.

  Raises:
    ValueError: an unknown mode; a gin file not in this checkout.
  """
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; modes: {sorted(MODES)}')
  command, default = MODES[mode]
  files = [resolve_gin_file(f) for f in (gin_files or [default])]
  return (['rest-jax', command] + [f'--gin_file={f}' for f in files] +
          [f'--workdir={workdir}'] + list(extra))


def check_workdir(workdir: str, local: bool) -> None:
  """A cloud job's hosts share nothing but storage: its work directory must be a URL.

  Raises:
    ValueError: a cloud (not `local`) job with a plain path as its work directory.
  """
  if not local and not _URL.match(workdir):
    raise ValueError(f'--workdir={workdir!r}: a cloud job needs a URL that every host and later '
                     'jobs can reach (gs://BUCKET/PATH); plain paths only with --local')


def pip_install(accelerator: accelerators.Accelerator, version: str) -> list[str]:
  """The image's install commands, in order: pinned requirements, the accelerator's JAX build
  (same version), the project without dependencies."""
  steps = ['pip install -r requirements.txt -c constraints.txt']
  if accelerator.jax_extra:
    steps.append(f"pip install 'jax[{accelerator.jax_extra}]=={version}' -c constraints.txt")
  steps.append('pip install --no-deps -e .')
  return steps


def job_spec(mode: str, accelerator: str, workdir: str, gin_files: Sequence[str] = (),
             extra: Sequence[str] = (), *, title: str = 'rest-jax', local: bool = False,
             base_image: str = BASE_IMAGE, command_override: str | None = None) -> dict[str, Any]:
  """The whole job as a JSON-able dict (what `--dry_run` prints and `launch.py` submits).

  Keys: title, mode, accelerator (`Accelerator.to_json`), executor ('local' | 'vertex'),
  base_image, jax ('jax[tpu]==V', ...), pip_install (commands), command (argv), command_line
  (its shell form), gin_files, workdir, env (per-host environment), entrypoint (the container's
  commands: pip_install then command_line).

  Args:
    command_override: a shell command run instead of `rest-jax` (local checks: 'echo ok').

  Raises:
    ValueError: as `accelerators.parse`, `job_args`, `check_workdir`; online RL on a multi-host
      slice (`rest-jax online` runs on one host).
  """
  acc = accelerators.parse(accelerator)
  if mode == 'online' and acc.num_hosts > 1:
    raise ValueError(f'{accelerator} has {acc.num_hosts} hosts; online RL (rest-jax online) runs '
                     'on one host: use a single-host slice (v5e-8, h100=8)')
  check_workdir(workdir, local)
  rest_argv = job_args(mode, gin_files, workdir, extra)
  argv = ['bash', '-c', command_override] if command_override else rest_argv
  version = jax_version()
  env = {'TF_CPP_MIN_LOG_LEVEL': '3'}
  if acc.num_hosts > 1:
    env[DISTRIBUTED_ENV] = '1'
  install = [] if local else pip_install(acc, version)
  line = shlex.join(argv)
  return {
      'title': title, 'mode': mode, 'accelerator': acc.to_json(),
      'executor': 'local' if local else 'vertex',
      'base_image': None if local else base_image,
      'jax': f'jax[{acc.jax_extra}]=={version}' if acc.jax_extra else f'jax=={version}',
      'pip_install': install, 'command': argv, 'command_line': line,
      'gin_files': [a.split('=', 1)[1] for a in rest_argv if a.startswith('--gin_file=')],
      'workdir': workdir, 'env': env, 'entrypoint': install + [line],
  }
