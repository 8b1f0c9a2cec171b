"""Multi-host runs as two local processes on `jax.distributed`, and Grow workers (issue: scale-out).

Each multi-host test starts `rest-jax` twice with `--distributed` on a free loopback port, 4 forced
CPU devices per process (one 8-device mesh, like this process's 8 devices), and compares with the
same command run here on one process:

* a Grow: the same records, record for record; killed on one host and resumed by one process;
* BC training: the same losses within float tolerance, and the checkpoint the two processes wrote
  restores in one process, equal to the one-process run's params within float tolerance;
* Grow workers (independent processes of one job, `REST_JAX_JOB_ID`): three of them, one killed
  mid-chunk, give the one-process Grow's records.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rest_jax import grow as grow_lib
from rest_jax import records as records_lib

from loop_utils import run, tensorboard_scalars
from test_cli import SMALL
from test_grow import assert_same_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY = 'checkpoints/bc_tiny_libreoffice_de_en/params.npz'
GROW = ['grow', '--gin_file=gin_configs/runs/grow.gin', f"--gin.grow.policy_dir='{POLICY}'",
        '--gin.grow.max_sources=30', '--gin.grow.chunk_size=5', '--gin.grow.num_decodes=2',
        '--gin.grow.max_decode_len=12', '--gin.grow.batch_size=8']
TRAIN = ['train', '--gin_file=gin_configs/runs/train_bc.gin', '--gin.train.num_steps=4',
         '--gin.train.eval_at_minutes=()'] + [a for a in SMALL if 'eval_at_minutes' not in a]
TIMEOUT = 240  # Seconds for one process (a hung collective must not hang CI).


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  env.pop('REST_JAX_KILL_AT_WRITE', None)
  env.update(extra)
  return env


def _start(args, workdir, env, log):
  return subprocess.Popen([sys.executable, '-m', 'rest_jax.main'] + list(args) +
                          [f'--workdir={workdir}'], cwd=ROOT, env=env,
                          stdout=open(log, 'w'), stderr=subprocess.STDOUT)


def _two_hosts(args, workdir, tmp_path, name, env_of=lambda i: {}):
  """Starts `rest-jax ARGS` as processes 0 and 1 of one job; returns (Popens, log files)."""
  port = _free_port()
  flags = ['--distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  logs = [str(tmp_path / f'{name}_{i}.log') for i in range(2)]
  return [_start(args + flags + [f'--process_id={i}'], workdir, _env(4, **env_of(i)), logs[i])
          for i in range(2)], logs


def _wait(procs, logs):
  """Waits for `procs` (Popens, each writing the log file of the same position)."""
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=TIMEOUT))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      codes.append('timeout')
  if any(c != 0 for c in codes):
    tails = '\n'.join(f'--- {log}\n' + open(log).read()[-3000:] for log in logs)
    pytest.fail(f'exit codes {codes}\n{tails}')


@pytest.fixture(scope='module')
def one_process_grow(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_process')
  run(GROW + [f'--workdir={workdir}'])
  out = str(workdir / 'grow_1')
  return grow_lib.read_grow_records(out), records_lib.read_manifest(out, records_lib.GROW)


def test_two_process_grow_equals_one_process_and_resumes_on_one(one_process_grow, tmp_path):
  want, manifest = one_process_grow
  assert manifest['counts']['chunks'] == 6
  workdir = tmp_path / 'two'
  _wait(*_two_hosts(GROW, workdir, tmp_path, 'grow'))
  out = str(workdir / 'grow_1')
  assert_same_records(grow_lib.read_grow_records(out), want)
  settings = records_lib.read_settings(out)
  assert settings['num_sources'] == 30
  with open(os.path.join(out, 'settings.json')) as f:
    assert json.load(f)['location']['process_count'] == 2

  # Killed: host 1 SIGKILLs itself before its first chunk's marker; host 0 is then killed too
  # (a dead host stalls the job's collectives); one process resumes the Grow.
  workdir = tmp_path / 'killed'
  procs, _ = _two_hosts(GROW, workdir, tmp_path, 'killed', env_of=lambda i: (
      {'REST_JAX_KILL_AT_WRITE': r'grow-\d+\.done#1'} if i == 1 else {}))
  assert procs[1].wait(timeout=TIMEOUT) == -signal.SIGKILL
  procs[0].kill()
  procs[0].wait()
  out = str(workdir / 'grow_1')
  assert not os.path.exists(os.path.join(out, 'manifest.json'))
  run(GROW + [f'--workdir={workdir}'])
  assert_same_records(grow_lib.read_grow_records(out), want)


def _final_params(model_dir, step):
  """The params of checkpoint `step`, restored in this process as numpy arrays, flattened."""
  import flax
  import orbax.checkpoint as ocp
  path = os.path.join(model_dir, 'checkpoints', str(step), 'state')
  c = ocp.PyTreeCheckpointer()
  tree = c.metadata(path).item_metadata.tree
  state = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
  return flax.traverse_util.flatten_dict(state['params'], sep='/')


def test_two_process_training_equals_one_process_and_restores_on_one(tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  run(TRAIN + [f'--workdir={one}'])
  _wait(*_two_hosts(TRAIN, two, tmp_path, 'train'))
  loss_one = tensorboard_scalars(str(one / 'bc'))['train/loss']
  loss_two = tensorboard_scalars(str(two / 'bc'))['train/loss']
  assert sorted(loss_two) == sorted(loss_one) == [4]
  np.testing.assert_allclose(loss_two[4], loss_one[4], rtol=1e-5)
  params_one = _final_params(str(one / 'bc'), 4)
  params_two = _final_params(str(two / 'bc'), 4)  # Saved by two processes, restored by one.
  assert params_two.keys() == params_one.keys()
  for name, a in params_two.items():
    # Attention key biases get a zero gradient (softmax is shift-invariant), so Adam turns
    # float noise into updates of the order of the learning rate: they are not compared.
    if not name.endswith('key_bias'):
      np.testing.assert_allclose(a, params_one[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_three_grow_workers_one_killed_mid_chunk_give_the_one_process_grow(one_process_grow,
                                                                          tmp_path):
  want, _ = one_process_grow
  workdir = tmp_path / 'workers'
  out = workdir / 'grow_1'
  job = {'REST_JAX_JOB_ID': 'grow-workers-test'}
  # Worker 0 dies just before renaming its first chunk file into place (mid-chunk: the records
  # are written, not yet the chunk or its marker). Workers 1 and 2 start once it holds a claim.
  logs = [str(tmp_path / f'worker_{i}.log') for i in range(3)]
  first = _start(GROW, workdir, _env(2, REST_JAX_KILL_AT_WRITE=r'grow-\d+-of-\d+\.tfrecord#1',
                                     **job), logs[0])
  deadline = time.time() + TIMEOUT
  while not (out / records_lib.CLAIMS_DIR).exists() and first.poll() is None:
    assert time.time() < deadline, 'worker 0 never claimed a chunk'
    time.sleep(0.2)
  others = [_start(GROW, workdir, _env(2, **job), logs[i]) for i in (1, 2)]
  assert first.wait(timeout=TIMEOUT) == -signal.SIGKILL
  _wait(others, logs[1:])
  assert_same_records(grow_lib.read_grow_records(str(out)), want)
  assert not [f for f in os.listdir(out) if '.tmp' in f]  # Worker 0's partial chunk: redone.
