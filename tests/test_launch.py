"""The launcher (xm_launch/): its job spec without xmanager, and `--dry_run` / `--local` in its own
environment (xm_launch/.venv, built by xm_launch/env.sh when it exists or under CI)."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from rest_jax import accelerators

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('xm_launch_spec',
                                               os.path.join(ROOT, 'xm_launch', 'spec.py'))
spec = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(spec)


def test_accelerator_names():
  v5e = accelerators.parse('v5litepod-8')
  assert (v5e.chip.name, v5e.num_chips, v5e.num_hosts, v5e.topology) == ('tpu_v5e', 8, 1, '2x4')
  assert accelerators.parse('v5e-8') == v5e
  v4 = accelerators.parse('v4-32')  # TensorCores: 16 chips, 4 per host.
  assert (v4.num_chips, v4.num_hosts, v4.topology, v4.jax_extra) == (16, 4, '2x2x4', 'tpu')
  assert accelerators.parse('v5p-8').num_chips == 4
  assert accelerators.parse('v5litepod-16').num_hosts == 4
  h = accelerators.parse('h100=16')
  assert (h.num_chips, h.num_hosts, h.chips_per_host, h.jax_extra) == (16, 2, 8, 'cuda12')
  assert accelerators.parse('a100x8') == accelerators.parse('a100=8')
  for bad in ('v4-7', 'tpu_v3=8', 'a100=0', 'h100=12'):
    with pytest.raises(ValueError):
      accelerators.parse(bad)


def test_job_args_and_workdir():
  assert spec.job_args('train', ['gin_configs/runs/train_bc.gin'], 'gs://b/run',
                       ['--gin.train.batch_size=512']) == [
                           'rest-jax', 'train', '--gin_file=gin_configs/runs/train_bc.gin',
                           '--workdir=gs://b/run', '--gin.train.batch_size=512']
  # A name under gin_configs/ resolves as rest-jax resolves it; no file: the mode's default.
  assert spec.job_args('grow', ['runs/grow.gin'], 'w')[2] == '--gin_file=gin_configs/runs/grow.gin'
  assert spec.job_args('rest-em', [], 'w')[:3] == [
      'rest-jax', 'rest-em', '--gin_file=gin_configs/runs/rest_em_gsm8k.gin']
  with pytest.raises(ValueError, match='not found'):
    spec.job_args('train', ['gin_configs/runs/nope.gin'], 'w')
  with pytest.raises(ValueError, match='unknown mode'):
    spec.job_args('eval', [], 'w')
  with pytest.raises(ValueError, match='URL'):
    spec.job_spec('train', 'v4-32', '/local/dir')
  spec.check_workdir('/local/dir', local=True)


def test_dry_run_spec_tpu_and_gpu():
  tpu = spec.job_spec('rest', 'v4-32', 'gs://b/iwslt', ['gin_configs/runs/rest_iwslt14_de_en.gin'])
  assert tpu['accelerator']['name'] == 'v4-32' and tpu['accelerator']['num_hosts'] == 4
  assert tpu['jax'] == f'jax[tpu]=={spec.jax_version()}' and tpu['base_image'] == 'python:3.11'
  assert any("'jax[tpu]==" in step for step in tpu['pip_install'])
  assert tpu['command'] == ['rest-jax', 'rest', '--gin_file=gin_configs/runs/rest_iwslt14_de_en.gin',
                            '--workdir=gs://b/iwslt']
  assert tpu['gin_files'] == ['gin_configs/runs/rest_iwslt14_de_en.gin']
  assert tpu['env'][spec.DISTRIBUTED_ENV] == '1'  # 4 hosts, one command.
  from rest_jax import distributed
  assert spec.DISTRIBUTED_ENV == distributed.DISTRIBUTED_ENV  # The variable main.py reads.
  assert tpu['entrypoint'][-1] == tpu['command_line']
  gpu = spec.job_spec('rest-em', 'a100=8', 'gs://b/gsm8k', [], ['--gin.grow.batch_size=64'])
  assert gpu['accelerator']['chip'] == 'a100' and gpu['accelerator']['num_hosts'] == 1
  assert gpu['jax'].startswith('jax[cuda12]==') and 'jax[tpu]' not in json.dumps(gpu)
  assert gpu['command'][-1] == '--gin.grow.batch_size=64'
  assert gpu['gin_files'] == ['gin_configs/runs/rest_em_gsm8k.gin']
  assert spec.DISTRIBUTED_ENV not in gpu['env']


def _launcher_env_wanted() -> bool:
  return os.path.exists(os.path.join(ROOT, 'xm_launch', '.venv')) or bool(os.environ.get('CI'))


@pytest.mark.skipif(not _launcher_env_wanted(),
                    reason='xm_launch/.venv absent and not CI (bash xm_launch/env.sh builds it)')
def test_online_mode_is_one_host():
  got = spec.job_spec('online', 'h100=8', 'gs://b/ppo', [])
  assert got['command'][:3] == ['rest-jax', 'online',
                                '--gin_file=gin_configs/runs/ppo_iwslt14_de_en.gin']
  assert spec.DISTRIBUTED_ENV not in got['env']
  with pytest.raises(ValueError, match='one host'):
    spec.job_spec('online', 'v4-32', 'gs://b/ppo', [])


def test_dry_run_and_local_in_launcher_env(tmp_path):
  start = time.perf_counter()
  subprocess.run(['bash', os.path.join(ROOT, 'xm_launch', 'env.sh')], check=True, timeout=900)
  print(f'launcher env ready in {time.perf_counter() - start:.1f} s')
  python = os.path.join(ROOT, 'xm_launch', '.venv', 'bin', 'python')
  launch = os.path.join(ROOT, 'xm_launch', 'launch.py')
  env = dict(os.environ, HOME=str(tmp_path))  # xmanager's local experiment database.
  out = subprocess.run([python, launch, '--mode=grow', '--accelerator=h100=8',
                        '--workdir=gs://bucket/run', '--dry_run', '--', '--gin.grow.batch_size=8'],
                       capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  got = json.loads(out.stdout)
  assert got['accelerator']['chip'] == 'h100' and got['jax'].startswith('jax[cuda12]==')
  assert got['command'] == ['rest-jax', 'grow', '--gin_file=gin_configs/runs/grow.gin',
                            '--workdir=gs://bucket/run', '--gin.grow.batch_size=8']
  out = subprocess.run([python, launch, '--accelerator=cpu', f'--workdir={tmp_path / "w"}',
                        '--local', '--command_override=echo launched-$((6 * 7))'],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr
  assert 'launched-42' in out.stdout + out.stderr  # Ran through bash on xm_local.Local.
  out = subprocess.run([python, launch, '--accelerator=cpu', f'--workdir={tmp_path / "w"}',
                        '--local', '--command_override=exit 3'],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode != 0 and 'non-zero code: 3' in out.stderr
