"""Losses of ReST's Improve step (BC, GOLD, BVMPO, OAC, ReST-EM's reward-weighted NLL) and of
the online-RL baselines (PPO, GRPO; `rest_jax.online`).

ReST (Gulcehre et al. 2023, arXiv 2308.08998) fine-tunes the policy on the filtered Grow data
with an offline-RL loss and compares four of them (BC, GOLD, BVMPO, OAC; BC gave the highest
reward, BVMPO was rated well by humans). ReST-EM (Singh et al. 2023, arXiv 2312.06585, sec. 3)
uses the reward-weighted NLL as its M-step. Each loss is a registered function, selected by
name (`make_loss_fn.name = 'bvmpo'` in gin, or `improve.loss`), and its hyperparameters are gin
parameters of the function itself, e.g. `bvmpo.eps_eta = 0.1`, `gold.clip_min = 0.2`.

Parameter layout of every loss::

  params = {'policy': EncoderDecoderModel params (unboxed),
            'aux':    loss-owned trainable params ({} except `oac`: the value head),
            'prior':  frozen BC-policy params (only where `needs_prior(name)`; `bvmpo`)}

Batch fields ([B] / [B, T] arrays; rows whose loss weights are all 0 are padding rows)::

  encoder_input_tokens [B, S] int32, decoder_input_tokens / decoder_target_tokens [B, T] int32,
  decoder_loss_weights [B, T] f32 (w: 1 on real target tokens),
  reward [B] f32 in [0, 1] (normalised reward-model score of the record),
  source_baseline [B] f32 (mean reward of all Grow records of the record's source),
  kl_weight [B] f32 (the annealed KL coefficient of this step, the same on every row; `bvmpo`;
    annealed from 1 to 1e-5 within each Improve step, restarting at the next: our choice, the
    reason in `kl_weight_schedule`).

Every loss is `fn(model, params, batch, rng, **hparams) -> (loss [] f32, metrics)`; `rng` is
the dropout key (None: no dropout, e.g. eval). Metrics are scalars and always contain

  'loss'       the loss;
  'nll'        token-mean NLL of the policy over all tokens with w > 0, weighted by w (nats);
  'num_tokens' the normaliser N of the loss.

The online losses `ppo` and `grpo` read rollout fields instead of `reward` (see `ppo`):
old_logprobs / advantages / returns / old_values / ref_logprobs [B, T] f32 and kl_coef [B] f32.

`trainer.Trainer` combines microbatches as sum_m(loss_m * N_m) / sum_m N_m. Every loss except
`bvmpo` is written as sum_{b,t} c_bt / sum_{b,t} n_bt with N = sum n_bt, so that combination is
exactly the full-batch loss (and, as N does not depend on the params, the full-batch gradient).
`bvmpo` cannot be: its top-half selection and softmax over rows (and its eta) are per batch, so
with microbatches they are per microbatch (its KL term still combines exactly). Metrics other
than 'loss' are combined with the same weights, which is exact only for those normalised by N.

All log-probabilities, losses and KLs are in nats.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Optional

import gin
import jax
import jax.numpy as jnp

from rest_jax import rl
from rest_jax.models.encoder_decoder import cross_entropy_with_logits
from rest_jax.models.transformer import PAD_ID

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]
LossFn = Callable[[PyTree, Batch, Optional[Array]], tuple[Array, dict[str, Array]]]

LOSSES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {}
_PRIOR_LOSSES = frozenset({'bvmpo'})
# Positional arguments of every loss; never gin-bindable.
_CALL_ARGS = ('model', 'params', 'batch', 'rng')


class UnknownLossError(KeyError, ValueError):
  """An unregistered loss name (a KeyError, and a ValueError for callers that expect one)."""

  def __str__(self):  # KeyError would print the repr of the message.
    return str(self.args[0]) if self.args else ''


def register(name: str) -> Callable:
  """Decorator: registers a loss `fn(model, params, batch, rng, **hparams)` under `name`.

  Raises:
    ValueError: `name` is already registered.
  """
  def wrap(fn):
    if name in LOSSES:
      raise ValueError(f'loss {name!r} is already registered')
    LOSSES[name] = fn
    return fn
  return wrap


def get_loss(name: str) -> Callable[..., tuple[Array, dict[str, Array]]]:
  """The registered loss function `name`.

  Raises:
    UnknownLossError (a KeyError and a ValueError): unknown name; the message lists the known ones.
  """
  try:
    return LOSSES[name]
  except KeyError:
    raise UnknownLossError(
        f'unknown loss {name!r}; known losses: {", ".join(sorted(LOSSES))}') from None


def needs_prior(name: str) -> bool:
  """Whether loss `name` reads `params['prior']` (the frozen BC policy): True for 'bvmpo'."""
  get_loss(name)
  return name in _PRIOR_LOSSES


def init_aux_params(name: str, model, rng: Array) -> PyTree:
  """Initial loss-owned trainable params `params['aux']` of loss `name`.

  'oac': the value head {'kernel': [emb_dim, 1] f32, 'bias': [1] f32}, both zeros (our choice:
  V = 0 at the start, so the first advantages are the rewards; `rng` is unused). 'ppo': the
  per-token `ValueHead` params (its output layer zeros: V = 0 at the start). Others: {}.
  Plain (unboxed) arrays: replicated when sharded.
  """
  get_loss(name)
  if name == 'ppo':
    emb = model.config.emb_dim
    return rl.ValueHead(emb).init(rng, jnp.zeros((1, 1, emb), jnp.float32))['params']
  if name == 'oac':
    emb = model.config.emb_dim
    return {'kernel': jnp.zeros((emb, 1), jnp.float32), 'bias': jnp.zeros((1,), jnp.float32)}
  return {}


@gin.configurable
def make_loss_fn(model, name: str = gin.REQUIRED, **hparams) -> LossFn:
  """`loss_fn(params, batch, rng) -> (loss [] f32, metrics)` of loss `name` (`Trainer(loss_fn=)`).

  Args:
    model: the policy's `EncoderDecoderModel`.
    name: a registered loss ('bc', 'gold', 'bvmpo', 'oac', 'reward_weighted_nll').
    **hparams: keyword hyperparameters of that loss; they override its gin bindings (e.g.
      `bvmpo.eps_eta`), which apply to those not given here.

  Raises:
    UnknownLossError: unknown `name`.
    TypeError: a hyperparameter the loss does not take.
  """
  fn = get_loss(name)
  accepted = set(inspect.signature(fn).parameters) - set(_CALL_ARGS)
  unknown = sorted(set(hparams) - accepted)
  if unknown:
    raise TypeError(f'loss {name!r} takes no hyperparameter(s) {unknown}; '
                    f'it takes {sorted(accepted)}')

  def loss_fn(params, batch, rng):
    return fn(model, params, batch, rng, **hparams)

  loss_fn.__name__ = f'{name}_loss_fn'
  return loss_fn


def kl_weight_schedule(step: int, num_steps: int, start: float = 1.0, end: float = 1e-5
                       ) -> float:
  """Geometric anneal of the KL coefficient from `start` (step 0) to `end` (step >= num_steps).

  kl(step) = start * (end / start) ** min(step / num_steps, 1), i.e. linear in log space
  (ReST, Gulcehre et al. 2023, arXiv 2308.08998: the BVMPO KL weight is annealed from 1 to 1e-5;
  geometric interpolation is our choice). Host-side Python (the caller puts the value in
  `batch['kl_weight']`); num_steps <= 0 -> end.

  Our choice: the anneal restarts at every Improve step. `improve.improve` calls this with its
  own step counter and `num_steps` (`improve.kl_anneal`), so every Improve step starts at weight
  1 (close to the BC prior) and ends near 1e-5, in the ReST loop as in a standalone
  `rest-jax improve`. Why: the paper gives the range, not the horizon; an Improve step is a
  self-contained fine-tune (fresh optimizer, its own threshold, data and early stopping) whose
  length is known when it starts, while the loop's total is not (early stopping), and a restart
  keeps a step's result independent of how many steps ran before it (resume, `compare_losses`).
  The cost: each step is pulled back toward the BC policy at its start (the prior stays the BC
  policy throughout; `improve.resolve_prior_policy_dir`). Note that the anneal runs over
  `num_steps`, so a step stopped early ends at a weight above `end`.

  Raises:
    ValueError: start or end <= 0.
  """
  if start <= 0 or end <= 0:
    raise ValueError(f'start and end must be > 0, got {start}, {end}')
  if num_steps <= 0:
    return float(end)
  frac = min(max(float(step) / float(num_steps), 0.0), 1.0)
  return float(start * math.exp(frac * math.log(end / start)))


# ------------------------------------------------------------------------------------------------
# Shared pieces.
# ------------------------------------------------------------------------------------------------

def _weights(batch: Batch) -> Array:
  w = batch.get('decoder_loss_weights')
  if w is None:
    w = batch['decoder_target_tokens'] != PAD_ID
  return jnp.asarray(w).astype(jnp.float32)


_safe_div = rl.safe_div
_wsum = rl.weighted_sum


def _log_probs(model, policy_params: PyTree, batch: Batch, rng: Optional[Array]
               ) -> tuple[Array, Array]:
  """(logits [B, T, V] f32, log pi(target_t | prefix, source) [B, T] f32) of the policy."""
  logits = model.compute_logits(policy_params, batch, rng).astype(jnp.float32)
  return logits, _target_logprobs(logits, batch['decoder_target_tokens'])


def _target_logprobs(logits: Array, targets: Array) -> Array:
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _base_metrics(loss, weights, token_logp, num_tokens) -> dict[str, Array]:
  return {'loss': loss, 'nll': _safe_div(-_wsum(weights, token_logp), jnp.sum(weights)),
          'num_tokens': num_tokens}


def _row_float(batch: Batch, key: str) -> Array:
  return jnp.asarray(batch[key]).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# BC.
# ------------------------------------------------------------------------------------------------

@register('bc')
@gin.configurable('bc', denylist=list(_CALL_ARGS))
def bc(model, params, batch, rng, *, label_smoothing: float = 0.0):
  """Behaviour cloning: token NLL on the kept (filtered) records; the reward is not used.

  ReST's Improve with the BC loss (Gulcehre et al. 2023: NLL on the data filtered at tau_i,
  the loss with the highest reward in its comparison). With w = decoder_loss_weights and
  l_bt the per-token (label-smoothed) cross-entropy of `cross_entropy_with_logits`:

    loss = sum_{b,t} w_bt l_bt / sum_{b,t} w_bt   (0 if sum w = 0),  N = sum w.

  Our choice: plain NLL by default (label_smoothing = 0.0), independent of the model's own
  `label_smoothing` (used for BC pre-training); set `bc.label_smoothing` to smooth.

  Args:
    model, params ({'policy': ...}), batch, rng: see the module docstring.
    label_smoothing: ls in [0, 1).
  Returns:
    (loss [] f32 nats, metrics: loss, nll, num_tokens, accuracy).
  """
  w = _weights(batch)
  logits = model.compute_logits(params['policy'], batch, rng).astype(jnp.float32)
  targets = batch['decoder_target_tokens']
  token_loss, token_nll = cross_entropy_with_logits(logits, targets, label_smoothing)
  total = jnp.sum(w)
  loss = _safe_div(_wsum(w, token_loss), total)
  metrics = _base_metrics(loss, w, -token_nll, total)
  active = w > 0
  correct = (jnp.argmax(logits, axis=-1) == targets) & active
  metrics['accuracy'] = _safe_div(jnp.sum(correct.astype(jnp.float32)),
                                  jnp.sum(active.astype(jnp.float32)))
  return loss, metrics


# ------------------------------------------------------------------------------------------------
# GOLD.
# ------------------------------------------------------------------------------------------------

@register('gold')
@gin.configurable('gold', denylist=list(_CALL_ARGS))
def gold(model, params, batch, rng, *, clip_min: float = 0.1, use_baseline: bool = False):
  """GOLD: off-policy policy gradient from demonstrations (Pang & He, ICLR 2021, sec. 3).

  Per-token importance weight q_bt = stopgrad(max(pi(y_t | y_<t, x), u)): GOLD approximates
  the sequence importance ratio by the per-token policy probability (behaviour policy taken as
  uniform over the demonstrations) and lower-bounds it by a small constant u for stability.
  Return R_b = reward_b (- source_baseline_b if `use_baseline`):

    loss = -sum_{b,t} w_bt q_bt R_b log pi(y_bt) / sum_{b,t} w_bt,   N = sum w.

  The GOLD paper uses per-token rewards (GOLD-delta: 1 per demonstration token; GOLD-s / GOLD-p:
  MLE-model log-prob / prob of the token, summed over the future). We use the record's sequence
  reward at every token (ReST's setting, a learned sequence-level reward). Our choices: q from
  the current policy (GOLD uses a periodically synced copy), default u = 0.1, no baseline by
  default, normalisation by the token count (not by sum q), so with u = 1 the loss is
  sum(w R nll) / sum(w) (the reward-weighted NLL with the token-count normaliser).

  Args:
    model, params ({'policy': ...}), batch, rng: see the module docstring.
    clip_min: u in (0, 1]; u = 1 makes every q = 1.
    use_baseline: subtract `source_baseline` from the reward.
  Returns:
    (loss [] f32, metrics: loss, nll, num_tokens, mean_is_weight (token mean of q),
    mean_return (token mean of R)).
  """
  w = _weights(batch)
  _, token_logp = _log_probs(model, params['policy'], batch, rng)
  ret = _row_float(batch, 'reward')
  if use_baseline:
    ret = ret - _row_float(batch, 'source_baseline')
  q = jax.lax.stop_gradient(jnp.maximum(jnp.exp(token_logp), clip_min))
  total = jnp.sum(w)
  loss = _safe_div(-_wsum(w, q * ret[:, None] * token_logp), total)
  metrics = _base_metrics(loss, w, token_logp, total)
  metrics['mean_is_weight'] = _safe_div(_wsum(w, q), total)
  metrics['mean_return'] = _safe_div(_wsum(w, jnp.broadcast_to(ret[:, None], w.shape)), total)
  return loss, metrics


# ------------------------------------------------------------------------------------------------
# BVMPO.
# ------------------------------------------------------------------------------------------------

def top_rows(advantage: Array, valid: Array, fraction: float = 0.5) -> Array:
  """Mask [B] bool of the top ceil(fraction * n_valid) valid rows by advantage.

  Ties broken by row order (the earlier row first: stable sort). V-MPO's "top half" of the
  advantages (Song et al. 2019, sec. 4) with fraction = 0.5; ceil so one valid row is kept.
  """
  b = advantage.shape[0]
  n_valid = jnp.sum(valid.astype(jnp.float32))
  k = jnp.ceil(fraction * n_valid - 1e-4)  # The 1e-4 absorbs float error (0.3 * 10 -> 3).
  key = jnp.where(valid, -advantage, jnp.inf)
  order = jnp.argsort(key, stable=True)
  ranks = jnp.zeros((b,), jnp.int32).at[order].set(jnp.arange(b, dtype=jnp.int32))
  return valid & (ranks.astype(jnp.float32) < k)


def _masked_log_softmax(z: Array, mask: Array) -> Array:
  """log softmax of z over mask (-inf off the mask; all -inf if the mask is empty)."""
  z = jnp.where(mask, z, -jnp.inf)
  zmax = jnp.max(jnp.where(mask, z, -1e30))
  zmax = jax.lax.stop_gradient(jnp.where(jnp.isfinite(zmax), zmax, 0.0))
  lse = jnp.log(jnp.sum(jnp.where(mask, jnp.exp(z - zmax), 0.0))) + zmax
  return jnp.where(mask, z - lse, -jnp.inf)


def _psi(advantage: Array, keep: Array, eta: Array) -> Array:
  """V-MPO weights psi = softmax(A / eta) over the kept rows, 0 elsewhere ([B] f32)."""
  return jnp.where(keep, jnp.exp(_masked_log_softmax(advantage / eta, keep)), 0.0)


def _kl_to_uniform(advantage: Array, keep: Array, eta: Array) -> Array:
  """KL(psi_eta || uniform over the kept rows) = sum psi log(psi * n_kept) (nats)."""
  logpsi = _masked_log_softmax(advantage / eta, keep)
  n = jnp.maximum(jnp.sum(keep.astype(jnp.float32)), 1.0)
  return jnp.sum(jnp.where(keep, jnp.exp(logpsi) * (logpsi + jnp.log(n)), 0.0))


def temperature_dual(eta: Array, advantage: Array, keep: Array, eps_eta: float) -> Array:
  """V-MPO temperature dual (Song et al. 2019, sec. 4) over the kept rows, [] f32:

    L(eta) = eta eps_eta + eta log mean_kept exp(A / eta)     (0 with no kept row).
  """
  z = jnp.where(keep, advantage / eta, -jnp.inf)
  zmax = jnp.max(jnp.where(keep, z, -1e30))
  n = jnp.maximum(jnp.sum(keep.astype(jnp.float32)), 1.0)
  lme = jnp.log(jnp.sum(jnp.where(keep, jnp.exp(z - zmax), 0.0))) + zmax - jnp.log(n)
  return jnp.where(jnp.any(keep), eta * eps_eta + eta * lme, 0.0)  # 0 with no kept row.


def solve_eta(advantage: Array, keep: Array, eps_eta: float, eta_min: float = 1e-6,
              eta_max: float = 1e6, num_steps: int = 64) -> Array:
  """argmin_eta of the V-MPO temperature dual over the kept rows, by bisection on log eta.

  L'(eta) = eps - KL(psi_eta || uniform_kept), and that KL falls monotonically with eta (psi's
  entropy rises with the temperature), so the minimiser solves KL(psi_eta || U) = eps; it is
  found by `num_steps` bisection steps on log eta in [log eta_min, log eta_max] (64 steps: a
  relative error ~1e-18 in eta, i.e. f32-exact). If KL < eps for every eta (eps >= log n_kept,
  or all kept advantages equal, or one kept row) L is increasing and eta_min is returned; if
  KL > eps even at eta_max, eta_max. No gradient (stop_gradient): eta is a per-batch constant.

  Args:
    advantage [B] f32, keep [B] bool, eps_eta > 0.
  Returns:
    eta [] f32.
  """
  advantage = jax.lax.stop_gradient(advantage)

  def body(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    too_peaked = _kl_to_uniform(advantage, keep, jnp.exp(mid)) > eps_eta  # eta too small.
    return jnp.where(too_peaked, mid, lo), jnp.where(too_peaked, hi, mid)

  bounds = (jnp.float32(math.log(eta_min)), jnp.float32(math.log(eta_max)))
  lo, hi = jax.lax.fori_loop(0, num_steps, body, bounds)
  return jnp.exp(0.5 * (lo + hi))


@register('bvmpo')
@gin.configurable('bvmpo', denylist=list(_CALL_ARGS))
def bvmpo(model, params, batch, rng, *, eps_eta: float = 0.1, top_fraction: float = 0.5,
          eta: Optional[float] = None, normalize_by_length: bool = True,
          eta_min: float = 1e-6, eta_max: float = 1e6, num_dual_steps: int = 64):
  """Behaviour V-MPO (ReST's BVMPO): V-MPO's policy step on offline data, KL to the BC policy.

  V-MPO (Song et al., ICLR 2020, sec. 4): advantage A_b = reward_b - source_baseline_b (the
  source's mean reward stands in for V-MPO's learned value; ReST computes it from the Grow
  data); keep the top `top_fraction` of the batch's valid rows by A (`top_rows`); weights
  psi_b = softmax_kept(A_b / eta); temperature eta = argmin of the dual
  L(eta) = eta eps_eta + eta log mean_kept exp(A / eta) (`solve_eta`). ReST replaces V-MPO's
  KL trust region to the old policy by a KL to the BC policy (`params['prior']`) whose
  coefficient is annealed (from 1 to 1e-5 over each Improve step, `kl_weight_schedule`; the
  caller passes it as `batch['kl_weight']`):

    lp_b   = sum_t w_bt log pi(y_bt) / sum_t w_bt        (normalize_by_length; else the sum)
    KL_bt  = sum_v pi_prior(v | ctx_bt) (log pi_prior(v | ctx_bt) - log pi(v | ctx_bt))
    loss   = -sum_b psi_b lp_b + sum_{b,t} w_bt kl_weight_b KL_bt / sum_{b,t} w_bt
    N      = sum w    (the normaliser of the KL term; see below).

  Our choices: eta is solved per batch in closed form (bisection, no gradient) instead of being
  a learned parameter trained on the dual (same fixed point, no extra optimizer state); a
  fixed `eta` skips the solve. The sequence log-likelihood is length-normalised by default so
  that long records do not dominate the weighted sum. KL over the full vocabulary at every
  target token with w > 0 of every valid row (not only the kept rows, as V-MPO's KL runs over
  all states), in the direction KL(prior || pi) of V-MPO's KL(pi_old || pi). The prior runs
  without dropout and under stop_gradient. Ties at the top-half boundary: earlier row kept.

  Microbatches: the selection, psi and eta are per (micro)batch, so `Trainer`'s combination by
  N is not the full-batch loss (only the KL term is); use num_microbatches = 1 for exact V-MPO.

  Args:
    model, params ({'policy', 'prior'}), batch (with kl_weight), rng: module docstring.
    eps_eta: KL bound of the temperature dual (nats); 0.1 is our default.
    top_fraction: fraction of valid rows kept (0.5 = V-MPO's top half).
    eta: fixed temperature (skips the dual solve); None: solve it.
    normalize_by_length: lp_b as the per-token mean (True) or the sum over tokens.
    eta_min, eta_max, num_dual_steps: bisection range and steps of `solve_eta`.
  Returns:
    (loss [] f32, metrics: loss, nll, num_tokens, policy_loss, kl (token-mean KL, nats),
    kl_loss (the weighted KL term), kl_weight, eta, dual_loss (L(eta)), psi_kl
    (KL(psi || uniform)), kept_rows, valid_rows, mean_advantage (over kept rows)).
  Raises:
    KeyError: no params['prior'].
  """
  if 'prior' not in params:
    raise KeyError("bvmpo needs params['prior'] (the frozen BC policy)")
  w = _weights(batch)
  logits, token_logp = _log_probs(model, params['policy'], batch, rng)
  row_w = jnp.sum(w, axis=-1)
  valid = row_w > 0
  seq_lp = _wsum(w, token_logp, axis=-1)
  row_lp = _safe_div(seq_lp, row_w) if normalize_by_length else seq_lp

  adv = jax.lax.stop_gradient(_row_float(batch, 'reward') - _row_float(batch, 'source_baseline'))
  keep = top_rows(adv, valid, top_fraction)
  if eta is None:
    eta_v = solve_eta(adv, keep, eps_eta, eta_min, eta_max, num_dual_steps)
  else:
    eta_v = jnp.float32(eta)
  eta_v = jax.lax.stop_gradient(eta_v)
  psi = jax.lax.stop_gradient(_psi(adv, keep, eta_v))
  policy_loss = -jnp.sum(jnp.where(keep, psi * row_lp, 0.0))

  prior_logits = model.compute_logits(jax.lax.stop_gradient(params['prior']), batch, None)
  prior_logp = jax.nn.log_softmax(prior_logits.astype(jnp.float32), axis=-1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  kl_tok = jnp.sum(jnp.exp(prior_logp) * (prior_logp - logp), axis=-1)  # [B, T]
  kl_w = _row_float(batch, 'kl_weight')[:, None]
  total = jnp.sum(w)
  kl_loss = _safe_div(_wsum(w, kl_w * kl_tok), total)
  loss = policy_loss + kl_loss

  metrics = _base_metrics(loss, w, token_logp, total)
  n_keep = jnp.sum(keep.astype(jnp.float32))
  metrics.update(
      policy_loss=policy_loss, kl=_safe_div(_wsum(w, kl_tok), total), kl_loss=kl_loss,
      kl_weight=_safe_div(_wsum(w, jnp.broadcast_to(kl_w, w.shape)), total), eta=eta_v,
      dual_loss=temperature_dual(eta_v, adv, keep, eps_eta),
      psi_kl=_kl_to_uniform(adv, keep, eta_v), kept_rows=n_keep,
      valid_rows=jnp.sum(valid.astype(jnp.float32)),
      mean_advantage=_safe_div(jnp.sum(jnp.where(keep, adv, 0.0)), n_keep))
  return loss, metrics


# ------------------------------------------------------------------------------------------------
# OAC.
# ------------------------------------------------------------------------------------------------

def value_estimate(aux: PyTree, encoded: Array, encoder_input_tokens: Array) -> Array:
  """V(x) [B] f32: linear head on the mean over non-PAD source positions of stopgrad(encoded).

  encoded [B, S, emb] (encoder output), aux {'kernel': [emb, 1], 'bias': [1]}.
  """
  mask = (encoder_input_tokens != PAD_ID).astype(jnp.float32)[..., None]
  feats = jax.lax.stop_gradient(encoded.astype(jnp.float32))
  pooled = jnp.sum(feats * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return (pooled @ aux['kernel'].astype(jnp.float32))[:, 0] + aux['bias'].astype(jnp.float32)[0]


@register('oac')
@gin.configurable('oac', denylist=list(_CALL_ARGS))
def oac(model, params, batch, rng, *, value_coef: float = 0.5):
  """Offline actor-critic with a learned state-value baseline (ReST's OAC).

  The critic is a linear value head V(x) on the mean-pooled, stop-gradient encoder output
  (`value_estimate`, params['aux']); the actor is the advantage-weighted log-likelihood of
  the records (a one-step, sequence-level advantage actor-critic on the offline data):

    A_b    = stopgrad(reward_b - V(x_b))
    loss   = sum_{b,t} w_bt [ -A_b log pi(y_bt) + value_coef (reward_b - V(x_b))^2 ] / sum w
    N      = sum w.

  Our choices: the value head reads the stop-gradient encoder output, so the critic does not
  shape the policy's representation and the actor's gradient never reaches the head; the
  squared error of each row is weighted by its token count (so the loss is one token-weighted
  mean and microbatches combine exactly); the encoder runs once, with the same dropout as the
  policy (training) or none (rng None); value_coef = 0.5 and a zero-initialised head.

  Args:
    model, params ({'policy', 'aux'}), batch, rng: see the module docstring.
    value_coef: weight of the critic's squared error.
  Returns:
    (loss [] f32, metrics: loss, nll, num_tokens, actor_loss, value_loss (token-weighted
    mean squared error, no coefficient), critic_loss (value_coef * value_loss), mean_value,
    mean_advantage (over valid rows)).
  """
  w = _weights(batch)
  enc_tokens = batch['encoder_input_tokens']
  enc_rng = dec_rng = None
  if rng is not None:
    enc_rng, dec_rng = jax.random.split(rng)
  encoded = model.encode(params['policy'], enc_tokens, enc_rng)
  logits = model.decode(params['policy'], encoded, enc_tokens, batch['decoder_input_tokens'],
                        dec_rng)
  token_logp = _target_logprobs(logits.astype(jnp.float32), batch['decoder_target_tokens'])

  reward = _row_float(batch, 'reward')
  value = value_estimate(params['aux'], encoded, enc_tokens)
  adv = jax.lax.stop_gradient(reward - value)
  row_w = jnp.sum(w, axis=-1)
  total = jnp.sum(w)
  actor_loss = _safe_div(-_wsum(w, adv[:, None] * token_logp), total)
  value_loss = _safe_div(_wsum(row_w, (reward - value) ** 2), total)
  loss = actor_loss + value_coef * value_loss
  metrics = _base_metrics(loss, w, token_logp, total)
  valid = (row_w > 0).astype(jnp.float32)
  n_valid = jnp.sum(valid)
  metrics.update(actor_loss=actor_loss, value_loss=value_loss,
                 critic_loss=value_coef * value_loss,
                 mean_value=_safe_div(jnp.sum(valid * value), n_valid),
                 mean_advantage=_safe_div(jnp.sum(valid * adv), n_valid))
  return loss, metrics


# ------------------------------------------------------------------------------------------------
# ReST-EM.
# ------------------------------------------------------------------------------------------------

@register('reward_weighted_nll')
@gin.configurable('reward_weighted_nll', denylist=list(_CALL_ARGS))
def reward_weighted_nll(model, params, batch, rng):
  """ReST-EM M-step: reward-weighted NLL (Singh et al. 2023, sec. 3), token-weighted.

  With r_b = reward_b >= 0 (binary in ReST-EM) and w the loss weights:

    loss = sum_{b,t} r_b w_bt nll_bt / sum_{b,t} r_b w_bt,   N = sum r w   (0 if N = 0),

  so with r in {0, 1} it is exactly the token-mean NLL of the positive records. Our choice:
  normalising by sum(r w) rather than by the token count (a self-normalised estimate of
  E_{p(y|x) r}[-log pi]; rows with r = 0 cost nothing, not even normaliser mass). Rewards must
  be non-negative (not checked inside jit).

  Returns:
    (loss [] f32, metrics: loss, nll (unweighted token mean over all w > 0), num_tokens (sum r w),
    mean_reward (token-weighted mean of r)).
  """
  w = _weights(batch)
  _, token_logp = _log_probs(model, params['policy'], batch, rng)
  r = _row_float(batch, 'reward')
  rw = w * r[:, None]
  norm = jnp.sum(rw)
  loss = _safe_div(-_wsum(rw, token_logp), norm)
  metrics = _base_metrics(loss, w, token_logp, norm)
  metrics['mean_reward'] = _safe_div(norm, jnp.sum(w))
  return loss, metrics


# ------------------------------------------------------------------------------------------------
# Online RL: PPO and GRPO (`rest_jax.online` collects the rollouts these losses train on).
# ------------------------------------------------------------------------------------------------

def _clipped_pg(model, params, batch, *, clip_eps, kl_estimator, with_value, value_clip_eps,
                value_coef):
  """The shared body of `ppo` and `grpo`: (loss, metrics)."""
  w = _weights(batch)
  out = model.compute_logits(params['policy'], batch, None, return_hidden=with_value)
  logits, hidden = out if with_value else (out, None)
  token_logp = _target_logprobs(logits.astype(jnp.float32), batch['decoder_target_tokens'])
  policy_loss, metrics = rl.ppo_policy_loss(token_logp, batch['old_logprobs'], batch['advantages'],
                                         w, clip_eps)
  total = jnp.sum(w)
  kl_tok = rl.kl_estimate(token_logp, jax.lax.stop_gradient(batch['ref_logprobs']), kl_estimator)
  kl_coef = _row_float(batch, 'kl_coef')[:, None]
  kl_loss = _safe_div(_wsum(w, kl_coef * kl_tok), total)
  loss = policy_loss + kl_loss
  metrics.update(policy_loss=policy_loss, kl_loss=kl_loss, kl=_safe_div(_wsum(w, kl_tok), total),
                 mean_advantage=_safe_div(_wsum(w, batch['advantages']), total))
  if with_value:
    values = rl.value_head(params['aux'], hidden)
    v_loss = rl.value_loss(values, batch['old_values'], batch['returns'], w, value_clip_eps)
    loss = loss + value_coef * v_loss
    metrics.update(value_loss=v_loss, mean_value=_safe_div(_wsum(w, values), total))
  metrics.update(_base_metrics(loss, w, token_logp, total))
  return loss, metrics


@register('ppo')
@gin.configurable('ppo', denylist=list(_CALL_ARGS))
def ppo(model, params, batch, rng, *, clip_eps: float = 0.2, value_coef: float = 0.5,
        value_clip_eps: Optional[float] = 0.2, kl_estimator: str = 'k3'):
  """PPO for a sequence policy (Schulman et al. 2017; as for RLHF: Ziegler et al. 2019, Ouyang
  et al. 2022): clipped surrogate + per-token value loss [+ a KL term to the reference].

    loss = rl.ppo_policy_loss(log pi, old_logprobs, advantages, w, clip_eps)
           + value_coef * rl.value_loss(V, old_values, returns, w, value_clip_eps)
           + sum_{b,t} w_bt kl_coef_b rl.kl_estimate(log pi, ref_logprobs)_bt / sum w,   N = sum w.

  Batch (rollout fields, `online.rollout_features`): old_logprobs [B, T] (the rollout policy's
  untempered per-token log-probs, stored by the sampler: the ratio is exact), advantages and
  returns [B, T] (GAE, `rl.gae`), old_values [B, T] (the rollout's V), ref_logprobs [B, T]
  (the frozen BC policy's), kl_coef [B] (0 when, as in Ziegler et al., the KL is a reward penalty
  folded into the advantages instead: `online.online(kl_penalty='reward')`).

  Our choices: no dropout (`rng` is unused) so that the first epoch's ratio is exactly 1; the
  value head reads the stop-gradient hidden states (`ValueHead`); token-weighted means over the
  minibatch (microbatches combine exactly); kl_estimator 'k3' for the optional loss term.

  Returns:
    (loss [] f32, metrics: loss, nll, num_tokens, policy_loss, value_loss, mean_value, kl_loss,
    kl (token mean of the estimate, nats), clip_fraction, ratio, approx_kl, mean_advantage).
  """
  del rng
  return _clipped_pg(model, params, batch, clip_eps=clip_eps, kl_estimator=kl_estimator,
                     with_value=True, value_clip_eps=value_clip_eps, value_coef=value_coef)


@register('grpo')
@gin.configurable('grpo', denylist=list(_CALL_ARGS))
def grpo(model, params, batch, rng, *, clip_eps: float = 0.2, kl_estimator: str = 'k3'):
  """GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1, eq. 3): PPO's clipped surrogate without a
  critic; every token of sample i carries its group-normalised advantage
  (`rl.grpo_advantages`) and the KL to the reference is a loss term with the k3 estimator
  (eq. 4):

    loss = rl.ppo_policy_loss(log pi, old_logprobs, advantages, w, clip_eps)
           + sum_{b,t} w_bt kl_coef_b k3_bt / sum w,     N = sum w.

  Our choice: one token-weighted mean over the minibatch, where eq. 3 averages each sample's
  tokens first (1 / |o_i|) and then the samples: long samples weigh more here (as in DAPO's
  token-level loss) and microbatches combine exactly. No dropout (`rng` unused).

  Returns:
    (loss [] f32, metrics: as `ppo` without the value terms).
  """
  del rng
  return _clipped_pg(model, params, batch, clip_eps=clip_eps, kl_estimator=kl_estimator,
                     with_value=False, value_clip_eps=None, value_coef=0.0)
