"""A compact t5x-style trainer: one jitted, sharded, donated train step; orbax checkpoints.

Pieces:
  * `make_optimizer` (gin): AdamW with linear warm-up then inverse-square-root, cosine or constant
    decay, global-norm clipping.
  * `TrainState`: step, params and optimizer state; sharded by the logical-axis rules of
    `rest_jax.partitioning`.
  * `Trainer`: builds the state and jits `train_step` once with explicit `in_shardings` /
    `out_shardings` and `donate_argnums`; gradient accumulation over microbatches with `lax.scan`;
    the dropout RNG of step `s` is `fold_in(rng, s)`, so a run is a pure function of its seed.
  * `Checkpointer`: orbax `CheckpointManager`s for the latest state (exact resume) and the best
    params by a dev metric (keep-best), with the gin config saved beside every checkpoint.
  * `LossGuard`: the NaN guard of the training loops (`train`, `improve`, `train_rm`): a NaN or
    infinite loss stops the run with `NonFiniteLossError` before its state is saved.

The loss is any `loss_fn(params, batch, rng) -> (loss, metrics)`: the model's cross-entropy for BC
training, or a ReST loss (`rest_jax.losses`) for Improve. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import flax
import flax.traverse_util
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from rest_jax import fileio, partitioning
from rest_jax.models import base

LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


@gin.configurable
def make_optimizer(learning_rate: float = 1e-3,
                   warmup_steps: int = 1000,
                   schedule: str = 'rsqrt',
                   decay_steps: int = 100_000,
                   weight_decay: float = 1e-4,
                   b1: float = 0.9,
                   b2: float = 0.98,
                   eps: float = 1e-9,
                   clip_norm: float | None = 1.0,
                   with_schedule: bool = False):
  """AdamW (Loshchilov & Hutter 2019) with a warm-up + decay schedule.

  Args:
    learning_rate: peak learning rate, reached after `warmup_steps`.
    warmup_steps: linear warm-up length (steps); 0 for none.
    schedule: 'rsqrt' (lr * sqrt(warmup / step) after warm-up; Vaswani et al. 2017, sec. 5.3),
      'cosine' (to 0 at `decay_steps`) or 'constant'.
    decay_steps: length of the cosine decay (steps).
    weight_decay: decoupled weight decay, applied to kernels and embeddings (rank >= 2) only.
    b1, b2, eps: Adam moments; b2 = 0.98 as in Vaswani et al. 2017.
    clip_norm: global gradient-norm clipping threshold, None for none.
    with_schedule: also return the schedule (for logging): `(optimizer, lr)`, `lr(count)` the
      learning rate of update `count` (0-based, an int32 array).

  Returns:
    The optax transformation (or the pair, `with_schedule`).

  Raises:
    ValueError: an unknown `schedule`.
  """
  warmup = max(warmup_steps, 1)
  if schedule == 'rsqrt':
    def lr(step):
      step = jnp.maximum(step.astype(jnp.float32) + 1.0, 1.0)
      return learning_rate * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))
  elif schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                            max(decay_steps, warmup_steps + 1))
  elif schedule == 'constant':
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup),
                               optax.constant_schedule(learning_rate)], [warmup])
  else:
    raise ValueError(f"unknown schedule {schedule!r}: use 'rsqrt', 'cosine' or 'constant'")
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  opt = optax.chain(*parts)
  return (opt, lr) if with_schedule else opt


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # [] int32, number of optimizer updates applied.
  params: Any           # pytree of float32 arrays, sharded by the logical-axis rules.
  opt_state: Any        # optax state; moments sharded like `params`, counters replicated.


class Trainer:
  """Owns the mesh, the shardings and the jitted train step of one training run.

  Args:
    model: a `models.base.BaseModel` (t5x-style: `get_initial_variables`, `loss_fn`), e.g. an
      `EncoderDecoderModel`.
    optimizer: an optax transformation (e.g. `make_optimizer()`).
    mesh: a `Mesh(('data', 'model'))` (see `partitioning.create_mesh`).
    loss_fn: `loss_fn(params, batch, rng) -> (loss, metrics)`; default `model.loss_fn`.

  Raises:
    TypeError: `model` is not a `BaseModel`.
    num_microbatches: gradient accumulation: the batch is split into this many microbatches whose
      gradients are averaged (the batch size must be a multiple of it).
    seed: the run's seed; the dropout RNG of step s is `fold_in(PRNGKey(seed), s)`.
  """

  def __init__(self, model, optimizer: optax.GradientTransformation, mesh: Mesh,
               loss_fn: LossFn | None = None, num_microbatches: int = 1, seed: int = 0):
    base.check_model(model)
    self.model = model
    self.optimizer = optimizer
    self.mesh = mesh
    self.loss_fn = loss_fn or model.loss_fn
    self.num_microbatches = num_microbatches
    self.seed = seed
    self._state_shardings = None
    self._train_step = None

  def mesh_context(self):
    """The mesh and the logical-axis rules, for code that traces the model (activation constraints)."""
    return _MeshContext(self.mesh)

  # -- state ---------------------------------------------------------------------------------------

  def _abstract_boxed_state(self, input_shapes):
    def init(rng):
      variables = self.model.get_initial_variables(rng, input_shapes)
      params = variables['params']
      return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                        opt_state=self.optimizer.init(nn.meta.unbox(params)))
    return init, jax.eval_shape(init, jax.random.PRNGKey(self.seed))

  def state_shardings(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    """Shardings of every leaf of the `TrainState` (optimizer moments follow their params)."""
    if self._state_shardings is None:
      _, boxed = self._abstract_boxed_state(input_shapes)
      self._state_shardings = partitioning.params_shardings(self.mesh, boxed)
    return self._state_shardings

  def abstract_state(self, input_shapes: Mapping[str, tuple[int, ...]]) -> TrainState:
    """The `TrainState` as `jax.ShapeDtypeStruct`s carrying their shardings (for restoring)."""
    _, boxed = self._abstract_boxed_state(input_shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        nn.meta.unbox(boxed), self.state_shardings(input_shapes))

  def init_state(self, input_shapes: Mapping[str, tuple[int, ...]],
                 params: Any | None = None) -> TrainState:
    """A fresh `TrainState`, created directly in its sharded layout (`jit` with `out_shardings`).

    Args:
      input_shapes: feature name -> shape of one (global) batch, e.g.
        {'encoder_input_tokens': (32, 64), 'decoder_input_tokens': (32, 64)}.
      params: start from these params (unboxed pytree, e.g. a BC policy) instead of random init;
        the optimizer state is fresh and the step is 0 (how every ReST Improve step starts).
    """
    init, _ = self._abstract_boxed_state(input_shapes)
    shardings = self.state_shardings(input_shapes)

    def unboxed_init(rng):
      return nn.meta.unbox(init(rng))

    with self.mesh_context():
      if params is None:
        return jax.jit(unboxed_init, out_shardings=shardings)(jax.random.PRNGKey(self.seed))
      params = jax.device_put(params, shardings.params)
      opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(params)
      return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                        params=params, opt_state=opt_state)

  # -- steps ---------------------------------------------------------------------------------------

  def _grads(self, params, batch, rng):
    """(loss, metrics, grads) of the batch; with microbatches, the exact token-weighted mean.

    `loss_fn` returns a per-token mean and `metrics['num_tokens']` (sum of loss weights); the
    microbatch results are weighted by their token counts, so accumulation gives the gradient of
    the full-batch token mean (not a mean of microbatch means).
    """
    grad_fn = jax.value_and_grad(self.loss_fn, has_aux=True)
    m = self.num_microbatches
    if m == 1:
      (loss, metrics), grads = grad_fn(params, batch, rng)
      return loss, metrics, grads

    def split(x):  # [B, ...] -> [m, B/m, ...], microbatch i = rows i, i+m, ... (every shard).
      return x.reshape((-1, m) + x.shape[1:]).swapaxes(0, 1)

    micro = jax.tree.map(split, batch)

    def body(acc, xs):
      i, mb = xs
      (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
      n = metrics['num_tokens']
      weighted = jax.tree.map(lambda v: v * n, (loss, metrics, grads))
      return jax.tree.map(jnp.add, acc, (weighted, n)), None

    shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng))
    (loss0, metrics0), grads0 = shapes
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        ((loss0, metrics0, grads0), jax.ShapeDtypeStruct((), jnp.float32)))
    ((loss, metrics, grads), total), _ = jax.lax.scan(body, init, (jnp.arange(m), micro))
    loss, metrics, grads = jax.tree.map(lambda v: v / jnp.maximum(total, 1e-8),
                                        (loss, metrics, grads))
    metrics['num_tokens'] = total
    return loss, metrics, grads

  def _step(self, state: TrainState, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    loss, metrics, grads = self._grads(state.params, batch, rng)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    """One optimizer update: `(state, batch) -> (new_state, metrics)`; `state` is donated.

    `batch` must already be on the mesh (`partitioning.shard_batch`). Compiled once per batch
    shape with the state's shardings in and out.
    """
    if self._train_step is None:
      shardings = self._state_shardings
      if shardings is None:
        raise ValueError('call init_state (or state_shardings) before train_step')
      self._train_step = jax.jit(
          self._step,
          in_shardings=(shardings, partitioning.batch_sharding(self.mesh),
                        partitioning.replicated(self.mesh)),
          out_shardings=(shardings, partitioning.replicated(self.mesh)),
          donate_argnums=(0,))
    with self.mesh_context():
      return self._train_step(state, batch, jax.random.PRNGKey(self.seed))


class _MeshContext:
  def __init__(self, mesh):
    self.mesh = mesh
    self._stack = []

  def __enter__(self):
    for ctx in (jax.set_mesh(self.mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES)):
      ctx.__enter__()
      self._stack.append(ctx)
    return self.mesh

  def __exit__(self, *exc):
    while self._stack:
      self._stack.pop().__exit__(*exc)


# -- checkpoints ----------------------------------------------------------------------------------

class Checkpointer:
  """Orbax checkpoints of a run in `model_dir`.

  * `model_dir/checkpoints/<step>/`: the whole `TrainState` (latest `keep` kept) for exact resume.
  * `model_dir/best/<step>/`: params only, the best `keep_best` by `best_metric` (keep-best).
  Every checkpoint also holds `config` (JSON: the operative gin config and the metrics).
  """

  def __init__(self, model_dir: str, keep: int = 2, best_metric: str | None = None,
               best_mode: str = 'max', keep_best: int = 1):
    self.model_dir = fileio.abspath(model_dir)
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=False)
    self.latest = ocp.CheckpointManager(os.path.join(self.model_dir, 'checkpoints'), options=opts)
    self.best_metric = best_metric
    self.best = None
    if best_metric:
      best_opts = ocp.CheckpointManagerOptions(
          max_to_keep=keep_best, create=True, enable_async_checkpointing=False,
          best_fn=lambda m: m[best_metric], best_mode=best_mode,
          keep_checkpoints_without_metrics=False)
      self.best = ocp.CheckpointManager(os.path.join(self.model_dir, 'best'), options=best_opts)

  @staticmethod
  def _config(metrics):
    return ocp.args.JsonSave({'gin': gin.operative_config_str(),
                              'metrics': {k: float(v) for k, v in (metrics or {}).items()}})

  def save(self, state: TrainState, metrics: Mapping[str, float] | None = None) -> None:
    step = int(jax.device_get(state.step))
    if self.latest.latest_step() != step:
      self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     config=self._config(metrics)))
      self.latest.wait_until_finished()
      fileio.note_write(os.path.join(self.model_dir, 'checkpoints', str(step)))

  def save_best(self, state: TrainState, metrics: Mapping[str, float]) -> bool:
    """Saves params if `metrics[best_metric]` is among the best; returns whether it is the best."""
    step = int(jax.device_get(state.step))
    if self.best.latest_step() != step:
      self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                                   config=self._config(metrics)),
                     metrics={k: float(v) for k, v in metrics.items()})
      self.best.wait_until_finished()
      fileio.note_write(os.path.join(self.model_dir, 'best', str(step)))
    return self.best.best_step() == step

  def restore_latest(self, target: TrainState) -> TrainState | None:
    """The latest saved state laid out like `target` (abstract or concrete), or None.

    A latest checkpoint that fails to restore (damaged on disk) is deleted with a warning and the
    one before it is restored instead (`keep` are kept), so the run resumes from there.

    Raises:
      ValueError: checkpoints exist but none of them restores (names the directory).
    """
    steps = sorted(self.latest.all_steps(), reverse=True)
    if not steps:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in steps:
      try:
        restored = self.latest.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored.state
      except Exception as e:  # noqa: BLE001  (orbax raises many types for a damaged checkpoint)
        logging.warning('checkpoint %s/checkpoints/%d does not restore (%s: %s); deleting it '
                        'and falling back to the one before', self.model_dir, step,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else '')
        self.latest.delete(step)
    raise ValueError(f'no checkpoint under {self.model_dir}/checkpoints restores (steps '
                     f'{steps}); delete {self.model_dir} and rerun the stage')

  def best_metrics(self) -> dict | None:
    if self.best is None or self.best.best_step() is None:
      return None
    return _saved_metrics(self.best, self.best.best_step())

  def latest_metrics(self, step: int) -> dict[str, float]:
    """The `metrics` saved with latest checkpoint `step` (`save(state, metrics)`; {} if none).

    Raises:
      FileNotFoundError (orbax's): no latest checkpoint of that step.
    """
    return _saved_metrics(self.latest, step)


def _saved_metrics(mngr: ocp.CheckpointManager, step: int) -> dict[str, float]:
  """The 'metrics' of the `config` JSON item of checkpoint `step` of `mngr`."""
  cfg = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return dict(cfg.config['metrics'])


class NonFiniteLossError(FloatingPointError):
  """A NaN or infinite training loss or parameter, found by `LossGuard`; nothing of it was saved.

  Attributes:
    step: the optimizer step (1-based: the loss of the step-th update, or the state after it).
    last_good: the last checkpoints saved before it, as in the message ('none' if none).
  """

  def __init__(self, message: str, step: int, last_good: str):
    super().__init__(message)
    self.step = step
    self.last_good = last_good


@jax.jit
def _all_finite(tree) -> jax.Array:
  """[] bool: every float leaf of `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class LossGuard:
  """The NaN guard of a training loop: a non-finite loss stops the run before it is saved.

  `add(step, loss)` after every train step keeps that step's loss (a device scalar: no host
  sync); `check()` at the loop's metric sync (where it `device_get`s its metrics anyway) reads all
  the losses kept since the last check, so the first bad step is named exactly whatever the sync
  period; `check(state)` before every checkpoint save (and before evaluating a state for one)
  also checks that the state's params are finite (a NaN / inf learning rate makes the params
  non-finite one step before the loss is). Saved states therefore always passed both checks.

  Args:
    run: how the messages name the run (its output folder).
    checkpointer: the run's `Checkpointer`, whose latest (and best) checkpoint the message names
      as the last good one; None for a run that saves only after training (`train_rm.fit`
      without a checkpointer).

  Raises (from `check`):
    NonFiniteLossError (a FloatingPointError): the message names the run, the step, the bad
      value and the last good checkpoint (path and step).
  """

  def __init__(self, run: str, checkpointer: 'Checkpointer | None' = None):
    self.run = run
    self.checkpointer = checkpointer
    self._pending: list[tuple[int, jax.Array]] = []

  def add(self, step: int, loss: jax.Array) -> None:
    """Keeps the loss of optimizer step `step` (the update that made the state of step `step`)."""
    self._pending.append((int(step), loss))

  def check(self, state: TrainState | None = None) -> None:
    """Checks the kept losses (in step order), then, if given, `state`'s params.

    Raises:
      NonFiniteLossError: a NaN or infinite kept loss, or a non-finite param in `state`.
    """
    pending, self._pending = self._pending, []
    if pending:
      for (step, _), value in zip(pending, jax.device_get([loss for _, loss in pending])):
        if not np.isfinite(value):
          self._fail(step, f'non-finite training loss {float(value)}')
    if state is not None and not bool(jax.device_get(_all_finite(state.params))):
      self._fail(int(jax.device_get(state.step)), 'non-finite parameters')

  def last_good(self) -> str:
    """The checkpoints saved so far: 'latest <path> (step s)[, best <path> (step b)]', or 'none'."""
    ckpt = self.checkpointer
    if ckpt is None:
      return 'none (this run saves only after training)'
    found = []
    for kind, mngr, step in (('latest', ckpt.latest, ckpt.latest.latest_step()),
                             ('best', ckpt.best, ckpt.best.best_step() if ckpt.best else None)):
      if step is not None:
        found.append(f'{kind} {os.path.join(str(mngr.directory), str(step))} (step {step})')
    return ', '.join(found) or 'none (no checkpoint saved yet)'

  def _fail(self, step: int, what: str):
    last = self.last_good()
    raise NonFiniteLossError(
        f'{self.run}: {what} at step {step}; stopping, the state of step {step} is not saved. '
        f'Last good checkpoint: {last}. A rerun resumes there and repeats the same steps: lower '
        'the learning rate or check the data.', step, last)


def abstract_params(model, mesh) -> Any:
  """`model`'s params as `jax.ShapeDtypeStruct`s carrying their shardings on `mesh`.

  The layout to restore a policy into (`restore_params`, `fileio.load_params_npz`) or to `device_put`
  given params with; param shapes do not depend on the batch, so a [1, 16] dummy batch traces it.
  """
  shapes = {'encoder_input_tokens': (1, 16), 'decoder_input_tokens': (1, 16)}
  return Trainer(model, make_optimizer(), mesh).abstract_state(shapes).params


def restore_policy(policy: str, target_params: Any) -> Any:
  """A policy's params: `policy` is a run dir (`restore_params`) or an `.npz` of
  `fileio.save_params_npz` (a repository path such as the shipped
  `checkpoints/bc_tiny_libreoffice_de_en/params.npz` works from any directory).

  Raises:
    FileNotFoundError: no checkpoint / file. ValueError: an `.npz` of another model.
  """
  if policy.endswith('.npz'):
    return fileio.load_params_npz(fileio.repo_path(policy), target_params)
  return restore_params(policy, target_params)


def restore_params(checkpoint_dir: str, target_params: Any) -> Any:
  """Params from a run: `<dir>/best` (best by dev metric) if present, else `<dir>/checkpoints`.

  Args:
    checkpoint_dir: a `model_dir` written by `Checkpointer`.
    target_params: params (or abstract ShapeDtypeStructs with shardings) giving the layout.

  Raises:
    FileNotFoundError: no checkpoint under `checkpoint_dir`.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_params)
  root = fileio.abspath(checkpoint_dir)  # orbax refuses relative paths (as in `Checkpointer`).
  best_dir = os.path.join(root, 'best')
  if fileio.isdir(best_dir):
    mngr = ocp.CheckpointManager(best_dir)
    step = mngr.latest_step()
    if step is not None:
      # best_step needs the metrics; the manager reads them back from its own directory.
      step = mngr.best_step() if mngr.best_step() is not None else step
      try:
        return mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract))).params
      except Exception as e:  # noqa: BLE001  (orbax raises many types for a damaged checkpoint)
        raise ValueError(
            f'{best_dir}/{step} (the best checkpoint of {checkpoint_dir}) does not restore '
            f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); it is damaged: '
            f'delete {checkpoint_dir} and rerun the stage that wrote it '
            f'({os.path.basename(os.path.normpath(checkpoint_dir))})') from e
  mngr = ocp.CheckpointManager(os.path.join(root, 'checkpoints'))
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint under {checkpoint_dir}')
  restore_args = ocp.checkpoint_utils.construct_restore_args({'params': abstract})
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={'params': abstract}, restore_args=restore_args, partial_restore=True)))
  return restored.state['params']
