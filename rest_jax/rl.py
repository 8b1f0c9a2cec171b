"""Pure functions of online RL (`rest_jax.online`; the losses `ppo` / `grpo` of `rest_jax.losses`).

Per-token pieces of the losses (the KL estimators, PPO's clipped surrogate, the value loss, the
value head on the decoder's final hidden states) and the rollout-side computations (GAE, GRPO's
group-normalised advantages, whitening, per-token rewards, the adaptive KL controller). Arrays
are `[batch, length]` (a sample per row, its tokens a prefix of the row) unless stated;
log-probabilities and KLs in nats. Only jax, flax and numpy are imported.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


def safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (no NaN in the value or the gradient)."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def weighted_sum(weights: Array, values: Array, axis=None) -> Array:
  """sum(weights * values) where weights != 0 (a non-finite value at w = 0 contributes 0)."""
  return jnp.sum(jnp.where(weights != 0, weights * values, 0.0), axis=axis)


KL_ESTIMATORS = ('k1', 'k3')


def kl_estimate(logprobs: Array, ref_logprobs: Array, estimator: str = 'k1') -> Array:
  """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs, same shape, nats.

  With d = log pi_ref(y_t) - log pi(y_t) for y_t ~ pi (Schulman 2020, "Approximating KL
  divergence"):
    'k1': -d = log pi - log pi_ref: unbiased, can be negative per token; the per-token reward
      penalty of Ziegler et al. 2019 (eq. 2) and InstructGPT (Ouyang et al. 2022, eq. 2);
    'k3': exp(d) - d - 1 >= 0: unbiased, lower variance; the loss term of GRPO (Shao et al.
      2024, eq. 4).
  Both are exactly 0 where the two log-probs are equal.

  Raises:
    ValueError: an unknown estimator.
  """
  if estimator == 'k1':
    return logprobs - ref_logprobs
  if estimator == 'k3':
    d = ref_logprobs - logprobs
    return jnp.exp(d) - d - 1.0
  raise ValueError(f'unknown KL estimator {estimator!r}: use one of {KL_ESTIMATORS}')


def ppo_policy_loss(logprobs: Array, old_logprobs: Array, advantages: Array, weights: Array,
                    clip_eps: float = 0.2) -> tuple[Array, dict[str, Array]]:
  """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), a token-weighted mean to minimise.

  ratio_t = exp(log pi(y_t) - log pi_old(y_t)) and, with w the per-token weights,

    loss = -sum_t w_t min(ratio_t A_t, clip(ratio_t, 1 - eps, 1 + eps) A_t) / sum_t w_t.

  Args:
    logprobs: [B, T] f32, log pi(y_t | ...) of the policy being trained (nats).
    old_logprobs: [B, T] f32, of the rollout policy (nats; no gradient).
    advantages: [B, T] f32 (no gradient).
    weights: [B, T] f32 (0 on padding).
    clip_eps: epsilon (0.2 in Schulman et al. 2017 and InstructGPT).
  Returns:
    (loss [] f32, metrics: clip_fraction (share of weighted tokens whose ratio was clipped),
    ratio (token mean), approx_kl (token mean of log pi_old - log pi, nats)).
  """
  old = jax.lax.stop_gradient(old_logprobs)
  adv = jax.lax.stop_gradient(advantages)
  log_ratio = logprobs - old
  ratio = jnp.exp(log_ratio)
  surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
  total = jnp.sum(weights)
  clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
  metrics = {'clip_fraction': safe_div(weighted_sum(weights, clipped), total),
             'ratio': safe_div(weighted_sum(weights, ratio), total),
             'approx_kl': safe_div(weighted_sum(weights, -log_ratio), total)}
  return safe_div(-weighted_sum(weights, surrogate), total), metrics


def value_loss(values: Array, old_values: Array, returns: Array, weights: Array,
               clip_eps: Optional[float] = None) -> Array:
  """Token-weighted squared error of the value head, [] f32 (nats^2 of return).

    l_t = 1/2 (V_t - R_t)^2, or with clip_eps the pessimistic clipped form of the PPO baselines
    (Dhariwal et al. 2017, `ppo2`): 1/2 max((V_t - R_t)^2, (V_old,t + clip(V_t - V_old,t,
    -eps, eps) - R_t)^2);  loss = sum w l / sum w.

  values, old_values (the rollout's, no gradient), returns (no gradient), weights: [B, T] f32.
  """
  ret = jax.lax.stop_gradient(returns)
  err = (values - ret) ** 2
  if clip_eps is not None:
    old = jax.lax.stop_gradient(old_values)
    err = jnp.maximum(err, (old + jnp.clip(values - old, -clip_eps, clip_eps) - ret) ** 2)
  return safe_div(weighted_sum(weights, 0.5 * err), jnp.sum(weights))


class ValueHead(nn.Module):
  """The PPO critic: an MLP on the decoder's final hidden states, V(x, y_<t) per position.

  [B, T, emb] -> [B, T] f32: Dense(hidden) -> gelu -> Dense(1), the output layer initialised to
  zeros (V = 0 before training: our choice). The hidden states enter under stop_gradient (our
  choice, as `oac`'s head: the critic does not shape the policy's representation; Ziegler et al.
  2019 and InstructGPT train a separate value network initialised from the reward model).
  """
  hidden: int

  @nn.compact
  def __call__(self, hidden_states: Array) -> Array:
    h = jax.lax.stop_gradient(hidden_states.astype(jnp.float32))
    h = nn.gelu(nn.Dense(self.hidden, name='hidden')(h))
    v = nn.Dense(1, kernel_init=nn.initializers.zeros, name='out')(h)
    return v[..., 0]


def value_head(aux: PyTree, hidden_states: Array) -> Array:
  """`ValueHead` with params `aux` on [B, T, emb] hidden states -> values [B, T] f32."""
  return ValueHead(aux['hidden']['kernel'].shape[-1]).apply({'params': aux}, hidden_states)


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over [batch, length].

    delta_t = r_t + gamma V_{t+1} - V_t,    A_t = sum_{k >= 0} (gamma lam)^k delta_{t+k},
    R_t = A_t + V_t (the value head's regression target),

  with V = 0 after a sample's last token (every sample ends the episode, EOS or not: our choice
  for the samples cut at the length limit).

  Args:
    rewards: [B, T] f32, per-token rewards (the sequence reward at the last token, the KL
      penalty on every token).
    values: [B, T] f32, V(x, y_<t) of the rollout.
    mask: [B, T], 1 on a sample's tokens (a prefix of each row), 0 after.
    gamma, lam: discount and GAE lambda (InstructGPT-style defaults 1.0 / 0.95).
  Returns:
    (advantages [B, T] f32, returns [B, T] f32), both 0 where mask is 0.
  """
  m = jnp.asarray(mask, jnp.float32)
  v = jnp.asarray(values, jnp.float32) * m
  r = jnp.asarray(rewards, jnp.float32) * m
  next_m = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
  next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1))) * next_m
  deltas = r + gamma * next_v - v

  def step(carry, x):
    delta, nm = x
    a = delta + gamma * lam * nm * carry
    return a, a

  _, adv = jax.lax.scan(step, jnp.zeros(m.shape[0], jnp.float32), (deltas.T, next_m.T),
                        reverse=True)
  adv = adv.T * m
  return adv, (adv + v) * m


def grpo_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
  """GRPO's outcome advantages (Shao et al. 2024, sec. 4.1.2): within each source's group,

    A_ij = (r_ij - mean_j r_i.) / (std_j r_i. + eps),   std the population std (ddof 0).

  A group of equal rewards gets zero advantages.

  Args:
    rewards: [num_sources, num_decodes] f32 sequence rewards.
    eps: added to the std (our choice of 1e-6; the paper leaves it unstated).
  Returns:
    [num_sources, num_decodes] f32.
  """
  r = jnp.asarray(rewards, jnp.float32)
  mean = jnp.mean(r, axis=1, keepdims=True)
  std = jnp.std(r, axis=1, keepdims=True)
  return (r - mean) / (std + eps)


def whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / (std + eps) over the entries with mask > 0 (0 elsewhere); [B, T] f32."""
  m = jnp.asarray(mask, jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(x * m) / n
  std = jnp.sqrt(jnp.sum(((x - mean) * m) ** 2) / n)
  return (x - mean) / (std + eps) * m


@flax.struct.dataclass
class KLController:
  """The KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019, sec. 2.2).

  Adaptive: after a rollout batch of n samples whose mean sequence KL to the reference is KL,

    e = clip(KL / target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n / horizon)

  (as in Ziegler et al.'s code, `AdaptiveKLController`: the paper's K_beta = n / horizon). Only
  `value` is state (in the checkpoint); `target` and `horizon` are settings (gin).
  """
  value: jax.Array                                                        # [] f32, beta
  target: Optional[float] = flax.struct.field(pytree_node=False, default=None)  # nats; None: fixed
  horizon: float = flax.struct.field(pytree_node=False, default=10000.0)  # samples

  @classmethod
  def create(cls, init: float, target: Optional[float] = None,
             horizon: float = 10000.0) -> 'KLController':
    """A controller at beta = `init` (adaptive iff `target` is given).

    Raises:
      ValueError: init < 0, target <= 0 or horizon <= 0.
    """
    if init < 0 or (target is not None and target <= 0) or horizon <= 0:
      raise ValueError(f'need init >= 0, target > 0 (or None), horizon > 0; got {init}, '
                       f'{target}, {horizon}')
    return cls(value=jnp.asarray(init, jnp.float32), target=target, horizon=float(horizon))

  def update(self, kl: float, num_samples: int) -> 'KLController':
    """The controller after a batch of `num_samples` samples with mean sequence KL `kl` (nats)."""
    if self.target is None:
      return self
    err = jnp.clip(jnp.asarray(kl, jnp.float32) / self.target - 1.0, -0.2, 0.2)
    return self.replace(value=self.value * (1.0 + err * num_samples / self.horizon))


def token_rewards(rewards: np.ndarray, lengths: np.ndarray, kl: np.ndarray, beta: float
                  ) -> np.ndarray:
  """Per-token rewards [n, T] f32: -beta * kl_t on a sample's tokens, plus its sequence reward
  [n] at its last token (lengths [n] >= 1; Ziegler et al. 2019 eq. 2, InstructGPT eq. 2)."""
  n, t = kl.shape
  mask = np.arange(t)[None, :] < lengths[:, None]
  out = np.where(mask, -beta * kl, 0.0).astype(np.float32)
  out[np.arange(n), np.maximum(lengths, 1) - 1] += rewards
  return out
