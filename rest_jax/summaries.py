"""TensorBoard scalars of the loop's training stages: one way for all of them.

`rest-jax train` (BC / the ReST-EM base model), every Improve step / M-step (`rest_jax.improve`)
and the reward model (`rest_jax.rewards.train_rm`) write their scalars with `metric_writer`, into
their own output folder, so `tensorboard --logdir <workdir>` shows the whole loop, one run per
stage folder (bc/, rm/, improve_<g>_<i>/, mstep_<i>/ ...). Tags: `train/...` at the host sync
points of the training loop, `dev/...` at its dev evaluations; steps are optimizer steps.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np

from rest_jax import fileio


def metric_writer(logdir: str):
  """A clu `MetricWriter` (TensorBoard event files in `logdir`, plus the scalars in the log) on
  process 0; None on the other processes, which write nothing. A URL `logdir` gets its event
  files at every `flush()` and at `close()` (written locally first: `_UploadingWriter`).

  Synchronous: a scalar is on disk after the writer's `flush()` (the callers flush at their
  evaluations and at the end). clu is imported lazily: its writer pulls in TensorFlow.
  """
  if jax.process_index() != 0:
    return None
  from clu import metric_writers
  if not fileio.is_url(logdir):
    return metric_writers.create_default_writer(logdir, asynchronous=False)
  staging = tempfile.mkdtemp(prefix='rest_jax_tb_')
  return _UploadingWriter(metric_writers.create_default_writer(staging, asynchronous=False),
                          staging, logdir)


class _UploadingWriter:
  """A clu writer into a local staging folder whose `flush()` / `close()` copy the event files to
  the URL `logdir`. Our choice: TensorFlow's event writer knows only the `gs://` of the URL
  schemes; this way every scheme that `rest_jax.fileio` reads and writes works, at the cost of
  re-uploading the (small, growing) event file at every flush."""

  def __init__(self, writer, staging: str, logdir: str):
    self._writer, self._staging, self._logdir = writer, staging, logdir

  def __getattr__(self, name):
    return getattr(self._writer, name)

  def flush(self) -> None:
    self._writer.flush()
    fileio.upload_tree(self._staging, self._logdir)

  def close(self) -> None:
    self._writer.close()
    fileio.upload_tree(self._staging, self._logdir)
    shutil.rmtree(self._staging, ignore_errors=True)


def train_scalars(metrics: Mapping[str, Any], learning_rate: float | None = None,
                  **extra: float) -> dict[str, float]:
  """`train/<name>` scalars from a train step's (host) metrics: every scalar metric of the loss
  but `num_tokens` (a count, not a curve), plus `train/learning_rate` (when known) and `extra`
  (e.g. minutes=...)."""
  out = {f'train/{k}': float(np.asarray(v)) for k, v in metrics.items()
         if k != 'num_tokens' and np.ndim(v) == 0}
  if learning_rate is not None:
    out['train/learning_rate'] = float(learning_rate)
  out.update({f'train/{k}': float(v) for k, v in extra.items()})
  return out


def last_learning_rate(schedule: Callable | None, step: int) -> float | None:
  """The learning rate of the update that made `step` (optax counts updates from 0:
  `schedule(step - 1)`); None without a schedule."""
  if schedule is None:
    return None
  return float(schedule(np.asarray(max(step - 1, 0), np.int32)))
