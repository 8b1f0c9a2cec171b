"""Launch a rest-jax run mode on a TPU slice or GPU hosts with XManager, or print its job spec.

    bash xm_launch/env.sh          # the launcher's own environment, xm_launch/.venv (xmanager)
    xm_launch/.venv/bin/python xm_launch/launch.py --mode=rest --accelerator=v5litepod-8 \
        --workdir=gs://BUCKET/rest/iwslt14 --gin_file=gin_configs/runs/rest_iwslt14_de_en.gin \
        -- --gin.grow.batch_size=64
    ... --dry_run      # print the job spec as JSON: no cloud access, xmanager not imported
    ... --local        # run the command here through xm_local.Local (an xm.Binary, no container)

Modes: train, grow, score, improve, rest, rest-em (the `rest-jax` subcommands; each has a default
run config, `spec.MODES`). Accelerators: TPU slices `v5litepod-8` (= `v5e-8`), `v4-32`, `v5p-8`,
GPUs `a100=8`, `h100=8` (`rest_jax/accelerators.py`). Every host runs the same command,
`rest-jax <mode> --gin_file=... --workdir=<URL> <extra>`, in a container from `--base_image` with
the pinned requirements and `jax[tpu]` or `jax[cuda12]` of the pinned jax version; a config that
runs on the CPU mesh runs unchanged on the accelerator's (only gin bindings change). Flags after
`--` go to `rest-jax`.

Cloud launches go to Vertex AI (`xm_local.Vertex`) and need gcloud credentials and a Docker-capable
packaging step: not exercised in CI. CI runs `--dry_run` and `--local` (tests/test_launch.py).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec as spec_lib  # noqa: E402  (pure logic; rest_jax.accelerators)

_MODE = flags.DEFINE_enum('mode', 'train', sorted(spec_lib.MODES), 'rest-jax subcommand to run.')
_ACCELERATOR = flags.DEFINE_string(
    'accelerator', 'v5litepod-8', 'TPU slice (v5litepod-8, v4-32, v5p-8) or GPUs (a100=8, h100=8).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Work directory, a URL (gs://...) for cloud jobs.')
_GIN_FILE = flags.DEFINE_multi_string('gin_file', [], 'Run configs (default: the mode\'s own).')
_TITLE = flags.DEFINE_string('title', 'rest-jax', 'Experiment title.')
_BASE_IMAGE = flags.DEFINE_string('base_image', spec_lib.BASE_IMAGE, 'Container base image.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the job spec as JSON and exit.')
_LOCAL = flags.DEFINE_bool('local', False, 'Run here with xm_local.Local (a binary, no container).')
_COMMAND_OVERRIDE = flags.DEFINE_string(
    'command_override', None, "A shell command run instead of rest-jax (checks: 'echo ok').")
flags.mark_flag_as_required('workdir')


def requirements(xm, acc):
  """The job's `xm.JobRequirements`: a TPU slice by its topology (or chip count), GPUs per host
  with one replica per host (each replica runs the same command)."""
  if acc.kind == 'tpu':
    return xm.JobRequirements(**{acc.xm_resource: acc.topology or acc.num_chips})
  if acc.kind == 'gpu':
    return xm.JobRequirements(**{acc.xm_resource: acc.chips_per_host}, replicas=acc.num_hosts)
  return xm.JobRequirements()


def run_local(spec: dict) -> None:
  """Runs the spec's command here: `xm.Binary` (the command's own executable, no container) on
  `xm_local.Local`, waiting for it to finish (its output goes to this terminal)."""
  from xmanager import xm, xm_local  # The local executor only: no cloud client is used.
  path, *args = spec['command']
  if not os.path.isabs(path):  # xm.Binary runs a file: PATH's (bash), else the project's .venv.
    import shutil
    venv_bin = os.path.join(spec_lib.ROOT, '.venv', 'bin', path)
    path = shutil.which(path) or (venv_bin if os.path.exists(venv_bin) else path)
  with xm_local.create_experiment(experiment_title=spec['title']) as experiment:
    [executable] = experiment.package([xm.Packageable(
        executable_spec=xm.Binary(path=path, dependencies=[]),
        executor_spec=xm_local.Local.Spec())])
    experiment.add(xm.Job(executable, executor=xm_local.Local(), args=args,
                          env_vars=spec['env']))


def run_cloud(spec: dict, acc) -> None:
  """Packages the repository as a Python container and submits it to Vertex AI."""
  from xmanager import xm, xm_local
  root = spec_lib.ROOT
  container = xm.PythonContainer(path=root, base_image=spec['base_image'],
                                 entrypoint=xm.CommandList(spec['entrypoint']))
  with xm_local.create_experiment(experiment_title=spec['title']) as experiment:
    [executable] = experiment.package([xm.Packageable(
        executable_spec=container, executor_spec=xm_local.Vertex.Spec())])
    experiment.add(xm.Job(executable, executor=xm_local.Vertex(requirements=requirements(xm, acc)),
                          env_vars=spec['env']))


def main(argv) -> None:
  extra = [a for a in argv[1:] if a != '--']
  spec = spec_lib.job_spec(_MODE.value, _ACCELERATOR.value, _WORKDIR.value, _GIN_FILE.value,
                           extra, title=_TITLE.value, local=_LOCAL.value,
                           base_image=_BASE_IMAGE.value, command_override=_COMMAND_OVERRIDE.value)
  if _DRY_RUN.value:
    print(json.dumps(spec, indent=2))
    return
  if _LOCAL.value:
    logging.set_verbosity(logging.WARNING)  # xmanager's local database set-up logs at INFO.
    run_local(spec)
  else:
    from rest_jax import accelerators
    run_cloud(spec, accelerators.parse(_ACCELERATOR.value))


if __name__ == '__main__':
  app.run(main)
