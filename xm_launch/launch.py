"""Launch a rest-jax gin config on a cloud TPU/GPU host with XManager (the `[launch]` extra).

    pip install -e '.[launch]'
    python xm_launch/launch.py --command=train --gin_file=gin_configs/runs/train_bc.gin \
        --accelerator=tpu_v3=8 --workdir=gs://BUCKET/rest/bc -- --gin.train.batch_size=512

The job runs exactly the command a researcher runs locally (`rest-jax <command> --gin_file=...`),
so a config that works on the CPU mesh runs unchanged on the accelerator's mesh; only gin bindings
(batch size, `create_mesh.num_partitions`, model size) change. This script is not exercised in CI
(it needs cloud credentials); `job_args` is, by tests/test_launch.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_args(command: str, gin_files: Sequence[str], workdir: str,
             extra: Sequence[str] = ()) -> list[str]:
  """The `rest-jax` command line of the job (what runs on the accelerator host).

  Raises:
    ValueError: no gin file, or a gin file that does not exist in this checkout.
  """
  if not gin_files:
    raise ValueError('at least one --gin_file is required')
  for f in gin_files:
    if not os.path.exists(os.path.join(ROOT, f)):
      raise ValueError(f'gin file {f!r} not found under {ROOT}')
  return (['rest-jax', command] + [f'--gin_file={f}' for f in gin_files] +
          [f'--workdir={workdir}'] + list(extra))


def parse_accelerator(spec: str) -> dict[str, int]:
  """'tpu_v3=8' -> {'tpu_v3': 8} (an `xm.JobRequirements` keyword)."""
  name, _, count = spec.partition('=')
  return {name: int(count or 1)}


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--command', default='train')
  parser.add_argument('--gin_file', action='append', default=[])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--accelerator', default='tpu_v3=8')
  parser.add_argument('--title', default='rest-jax')
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != '--']
  cmd = job_args(args.command, args.gin_file, args.workdir, extra)

  from xmanager import xm, xm_local  # Only needed to actually launch.
  with xm_local.create_experiment(experiment_title=args.title) as experiment:
    spec = xm.PythonContainer(path=ROOT, base_image='python:3.11',
                              entrypoint=xm.CommandList([
                                  'pip install -r requirements.txt -c constraints.txt',
                                  'pip install --no-deps -e .', ' '.join(cmd)]))
    [executable] = experiment.package([xm.Packageable(
        executable_spec=spec, executor_spec=xm_local.Vertex.Spec())])
    requirements = xm.JobRequirements(**parse_accelerator(args.accelerator))
    experiment.add(xm.Job(executable, executor=xm_local.Vertex(requirements=requirements)))


if __name__ == '__main__':
  main(sys.argv[1:])
