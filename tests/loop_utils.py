"""Helpers of the loop tests (`test_rest.py`, `test_rest_em.py`): run the CLI, read a report, read
TensorBoard scalars."""

import json
import os
from typing import Any, Sequence

import gin

from rest_jax import main as main_lib


def run(args: Sequence[str]) -> None:
  """`rest-jax ARGS` in this process, from an empty gin config (as a fresh process would)."""
  gin.clear_config()
  main_lib.main(list(args))


def strip(obj: Any, keys: Sequence[str]) -> Any:
  """`obj` without the dict entries named `keys` at any depth (wall-clock times, paths: what a
  resumed run legitimately changes)."""
  if isinstance(obj, dict):
    return {k: strip(v, keys) for k, v in obj.items() if k not in keys}
  if isinstance(obj, list):
    return [strip(v, keys) for v in obj]
  return obj


def report(workdir: str) -> dict:
  with open(os.path.join(workdir, 'report.json')) as f:
    return json.load(f)


def tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """The scalars of the event files in `logdir` as TensorBoard reads them: tag -> {step: value}."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
          for tag in acc.Tags()['tensors']}
