"""Tests for `dca_jax.ops.projection`: the projection with a fast weight gradient computes exactly
`x @ w` and its derivatives, in every mode of autodiff, and every layer's `nnx.Linear` uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dca_jax.ops import projection


def _data(shape, out, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape), rng.normal(size=(shape[-1], out))


@pytest.mark.parametrize("shape,out", [((7, 5), 3), ((2, 9, 16), 33), ((1, 3, 4, 8), 1)])
def test_projection_and_its_gradients_match_float64(shape, out):
  """Forward and both gradients of sum(sin(x w)) against the float64 formulas."""
  x, w = _data(shape, out)
  y = x @ w
  expected = (np.sin(y).sum(), x.reshape(-1, shape[-1]).T @ np.cos(y).reshape(-1, out),
              np.cos(y) @ w.T)
  loss = lambda x, w: jnp.sum(jnp.sin(projection.project(x, w)))
  x32, w32 = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
  value, (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x32, w32)
  np.testing.assert_allclose(value, expected[0], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, expected[1], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dx, expected[2], rtol=1e-5, atol=1e-4)


def test_every_mode_of_autodiff_equals_the_plain_product():
  """grad of one argument (the other a symbolic zero), jvp, jacfwd, hessian and vmap give what
  the same calls give on `x @ w`."""
  x, w = (jnp.asarray(a, jnp.float32) for a in _data((3, 4, 6), 5, seed=1))
  fast = lambda x, w: jnp.sum(jnp.tanh(projection.project(x, w)) ** 2)
  plain = lambda x, w: jnp.sum(jnp.tanh(x @ w) ** 2)
  tangents = (jnp.ones_like(x), jnp.full_like(w, 0.5))
  for transform in (jax.grad, lambda f: jax.grad(f, argnums=1),
                    lambda f: jax.grad(f, argnums=(0, 1)),
                    lambda f: lambda x, w: jax.jvp(f, (x, w), tangents),
                    lambda f: jax.jacfwd(f, argnums=1), lambda f: jax.hessian(f, argnums=1)):
    got, want = transform(fast)(x, w), transform(plain)(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  batched = jax.vmap(projection.project)(x, jnp.stack([w] * 3))
  np.testing.assert_allclose(batched, x @ w, rtol=1e-6, atol=1e-6)


def test_low_precision_inputs_keep_their_dtypes():
  """bfloat16 inputs with a float32 result: the gradients come back in the inputs' dtype."""
  x, w = (jnp.asarray(a, jnp.bfloat16) for a in _data((4, 8), 3, seed=2))
  y = projection.project(x, w, None, jnp.float32)
  assert y.dtype == jnp.float32
  dx, dw = jax.grad(lambda x, w: projection.project(x, w, None, jnp.float32).sum(),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_allclose(dw.astype(jnp.float32),
                             jnp.broadcast_to(x.astype(jnp.float32).sum(0)[:, None], w.shape),
                             rtol=1e-2, atol=1e-2)


def test_dot_general_routes_only_projections():
  """A projection of the last axis by a 2-D kernel goes through `project`; any other product
  (batch dims, another contracting axis) is `jax.lax.dot_general` itself."""
  x, w = (jnp.asarray(a, jnp.float32) for a in _data((2, 3, 4), 5, seed=3))
  dims = (((2,), (0,)), ((), ()))
  jaxpr = str(jax.make_jaxpr(lambda x, w: projection.dot_general(x, w, dims))(x, w))
  assert "custom_jvp_call" in jaxpr
  np.testing.assert_allclose(projection.dot_general(x, w, dims), x @ w, rtol=1e-6)
  a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
  batch_dims = (((2,), (1,)), ((0,), (0,)))
  jaxpr = str(jax.make_jaxpr(lambda a, b: projection.dot_general(a, b, batch_dims))(a, b))
  assert "custom_jvp_call" not in jaxpr
  np.testing.assert_allclose(projection.dot_general(a, b, batch_dims), a @ b)


def test_layers_use_the_projection():
  """Every layer's projections and the LM's MLP and head run through `project` (same parameters
  and outputs as a plain `nnx.Linear`)."""
  from dca_jax.nn import SoftmaxAttention, TransformerLM, TransformerConfig
  layer = SoftmaxAttention(16, 2, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 3, 16))
  assert "custom_jvp_call" in str(jax.make_jaxpr(lambda x: layer.q_proj(x))(x))
  plain = nnx.Linear(16, 16, use_bias=False, rngs=nnx.Rngs(0))
  plain.kernel[...] = layer.q_proj.kernel[...]
  np.testing.assert_allclose(layer.q_proj(x), plain(x), rtol=1e-6)
  model = TransformerLM(TransformerConfig(vocab_size=11, d_model=16, num_layers=1, num_heads=2,
                                          attention="softmax"), rngs=nnx.Rngs(0))
  jaxpr = str(jax.make_jaxpr(lambda t: model(t))(jnp.zeros((1, 4), jnp.int32)))
  # q, k, v, out, the MLP's three and the head: 8 projections.
  assert jaxpr.count("custom_jvp_call") >= 8


def test_projection_study_prints_one_row_per_case(capsys):
  """`python -m experiments.projection_study` (the measurement the module cites) at toy size."""
  from experiments import projection_study  # pylint: disable=g-import-not-at-top
  assert projection_study.main(["--layers", "matmul,linear", "--lengths", "32",
                                "--repeats", "1"]) == 0
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
  assert [row[:2] for row in rows] == [["matmul", "32"], ["linear", "32"]]
  assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in rows)
  assert projection.project is projection_study.FAST        # the library's variant restored
