"""Tests for `dca_jax.causal_short_conv` (`dca_jax/ops/conv.py`), DCA's short convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import oracles
from dca_jax import causal_short_conv


def test_short_conv_matches_numpy():
  """The causal depthwise convolution, with resets and a history, against a loop in float64."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 5))
  kernel = rng.normal(size=(3, 5))
  history = rng.normal(size=(2, 2, 5))
  reset = np.zeros((2, 9), bool)
  reset[1, 4] = True
  got = causal_short_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                          jnp.asarray(reset))
  np.testing.assert_allclose(np.asarray(got), oracles.short_conv(x, kernel, reset), rtol=1e-5,
                             atol=1e-5)
  # Without reset, a history continues the sequence.
  got = causal_short_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                          history=jnp.asarray(history, jnp.float32))
  ext = np.concatenate([history, x], axis=1)
  expected = sum(kernel[i] * ext[:, i:i + 9] for i in range(3))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(expected, oracles.short_conv(x, kernel, history=history), atol=1e-12)


def _linear_gradient(fn, arg):
  """d sum(fn(arg)) / d arg for a function linear in `arg`, one unit input at a time (float64)."""
  grad = np.zeros(arg.shape)
  for index in np.ndindex(arg.shape):
    unit = np.zeros(arg.shape)
    unit[index] = 1.0
    grad[index] = fn(unit).sum()
  return grad


def test_short_conv_gradients_match_numpy():
  """The hand-written backward pass (kernel, input and history gradients) against the float64
  loop, which is linear in each argument, with resets (one at the first token) and S = 1, 2, 4."""
  rng = np.random.default_rng(1)
  for size, time, dim in ((1, 3, 2), (2, 7, 3), (4, 11, 5)):
    x = rng.normal(size=(2, time, dim))
    kernel = rng.normal(size=(size, dim))
    history = rng.normal(size=(2, size - 1, dim))
    weight = rng.normal(size=(2, time, dim))                     # the loss is sum(weight * y)
    reset = np.zeros((2, time), bool)
    reset[0, 0] = True
    reset[1, time // 2] = True
    f32 = lambda a: jnp.asarray(a, jnp.float32)

    def loss(x, kernel, history, reset=reset):
      return jnp.sum(f32(weight) * causal_short_conv(x, kernel, jnp.asarray(reset), history))

    for with_reset in (False, True):
      r = reset if with_reset else None
      got = jax.grad(lambda *a: loss(*a, reset=r) if r is not None else
                     jnp.sum(f32(weight) * causal_short_conv(*a[:2], history=a[2])),
                     argnums=(0, 1, 2))(f32(x), f32(kernel), f32(history))
      expected = (
          _linear_gradient(lambda u: weight * oracles.short_conv(u, kernel, r, history=history)
                           - weight * oracles.short_conv(0 * u, kernel, r, history=history), x),
          _linear_gradient(lambda u: weight * oracles.short_conv(x, u, r, history=history), kernel),
          _linear_gradient(lambda u: weight * oracles.short_conv(x, kernel, r, history=u)
                           - weight * oracles.short_conv(x, kernel, r, history=0 * u), history))
      for name, g, e in zip(("x", "kernel", "history"), got, expected):
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5, atol=1e-5, err_msg=name)
