"""Tests for `dca_jax/ops/dca_params.py`: `init_params`, `half_life_bias`, `compute_weights` and the
checks of `DCAWeights` at the boundary of both DCA ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import (attention_compress, compute_weights, half_life_bias, init_params,
                     memory_state_update)
from oracles import (BATCH, D_MODEL, FEAT, HEAD_DIM, HEADS, TIME, VALUE_DIM, WINDOW, jit_weights,
                     random_params, random_x, step_weights, weights_and_state)


@pytest.mark.parametrize("num_heads,window", [(1, 8), (2, 5), (4, 16), (7, 64)])
def test_half_life_bias(num_heads, window):
  bias = np.asarray(half_life_bias(num_heads, window), np.float64)
  log_decay = -np.logaddexp(0.0, bias)                             # -softplus, decay weights 0
  half_lives = np.log(0.5) / log_decay
  if num_heads == 1:
    np.testing.assert_allclose(half_lives, [window], rtol=1e-5)
    return
  expected = window * 16.0 ** (np.arange(num_heads) / (num_heads - 1))
  np.testing.assert_allclose(half_lives, expected, rtol=1e-4)
  np.testing.assert_allclose(np.exp(log_decay * expected), 0.5, rtol=1e-5)
  ratios = half_lives[1:] / half_lives[:-1]
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)        # geometric
  assert half_lives[0] == pytest.approx(window, rel=1e-5)
  assert half_lives[-1] == pytest.approx(16 * window, rel=1e-4)


def test_init_params_decay_is_the_half_life_at_init():
  """Through compute_weights with the initial (zero) decay weights: a_h^{half-life_h} = 1/2."""
  window = 6
  params = init_params(jax.random.key(0), D_MODEL, HEADS, window=window, head_dim=HEAD_DIM,
                       value_dim=VALUE_DIM, feature_dim=FEAT)
  assert not np.any(np.asarray(params.decay))
  weights = jit_weights(params, random_x(1, (BATCH, TIME, D_MODEL)))
  log_decay = np.asarray(weights.log_decay, np.float64)
  half_lives = np.array([window, 16 * window])                     # HEADS = 2: W and 16 W
  np.testing.assert_allclose(np.exp(log_decay * half_lives), 0.5, rtol=1e-4)


@pytest.mark.parametrize("field,bad,name", [
    ("q", lambda x: x[..., 0], "weights.q"),
    ("k", lambda x: x[..., :-2], "weights.k"),
    ("v", lambda x: x[..., :1, :], "weights.v"),
    ("q_features", lambda x: x[..., :1, :], "weights.q_features"),
    ("k_features", lambda x: x[..., :-1], "weights.k_features"),
    ("log_decay", lambda x: x[..., None], "weights.log_decay"),
    ("log_decay", lambda x: x[..., :1], "weights.log_decay"),
])
def test_malformed_weights_are_named(field, bad, name):
  weights, state = weights_and_state()
  weights = weights._replace(**{field: bad(getattr(weights, field))})
  with pytest.raises(ValueError, match=name):
    attention_compress(weights, window=WINDOW)
  with pytest.raises(ValueError, match=name):
    memory_state_update(state, step_weights(weights, 0))


def test_compute_weights_rejects_wrong_width():
  params = random_params(0)
  with pytest.raises(ValueError, match="x"):
    compute_weights(params, jnp.ones((1, 4, D_MODEL + 1)))
  with pytest.raises(ValueError, match="x"):
    compute_weights(params, jnp.ones((D_MODEL,)))
