"""The launcher builds exactly the local command line."""

import importlib.util
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    'launch', os.path.join(os.path.dirname(__file__), '..', 'xm_launch', 'launch.py'))
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)


def test_job_args():
  assert launch.job_args('train', ['gin_configs/runs/train_bc.gin'], 'gs://b/run',
                         ['--gin.train.batch_size=512']) == [
                             'rest-jax', 'train', '--gin_file=gin_configs/runs/train_bc.gin',
                             '--workdir=gs://b/run', '--gin.train.batch_size=512']
  with pytest.raises(ValueError, match='not found'):
    launch.job_args('train', ['gin_configs/runs/nope.gin'], 'w')
  with pytest.raises(ValueError, match='at least one'):
    launch.job_args('train', [], 'w')
  assert launch.parse_accelerator('tpu_v3=8') == {'tpu_v3': 8}
