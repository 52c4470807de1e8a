"""Tests for `dca_jax.causal_short_conv` (`dca_jax/ops/conv.py`), DCA's short convolution."""

from __future__ import annotations

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
