"""The planner's "auto" form supports every kind of autodiff: forward mode (jvp, jacfwd) and
reverse mode (grad), equal to the explicit forms'."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import gated_linear_attention


@pytest.mark.parametrize("time", [5, 200])      # quadratic and chunked gradient plans on CPU
def test_auto_mode_forward_and_reverse_mode_equal_the_recurrent_form(time):
  keys = jax.random.split(jax.random.key(time), 5)
  q, k = (jax.random.normal(keys[i], (1, time, 2, 4)) for i in range(2))
  v = jax.random.normal(keys[2], (1, time, 2, 3))
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (1, time, 2)) + 2.0)
  tangent = jax.random.normal(keys[4], q.shape)
  f = {mode: jax.jit(lambda q, mode=mode: jnp.sum(gated_linear_attention(q, k, v, g, mode=mode) ** 2))
       for mode in ("auto", "recurrent")}
  (_, jvp_auto), (_, jvp_ref) = (jax.jvp(f[m], (q,), (tangent,)) for m in ("auto", "recurrent"))
  np.testing.assert_allclose(jvp_auto, jvp_ref, rtol=1e-4)
  np.testing.assert_allclose(jax.grad(f["auto"])(q), jax.grad(f["recurrent"])(q), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(jax.jacfwd(f["auto"])(q), jax.grad(f["recurrent"])(q), rtol=1e-4,
                             atol=1e-5)
