"""dca_jax.ops.rowwise: the plain products, with einsum tangents. Values and every autodiff mode
against the broadcasting products they replace, in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax.ops.rowwise import outer_self, row_dot, scale_rows

CASES = {
    "scale_rows": (scale_rows, lambda x, s: x * s[..., None], ((2, 3, 5), (2, 3))),
    "row_dot": (row_dot, lambda x, y: jnp.sum(x * y, -1), ((2, 3, 5), (2, 3, 5))),
    "outer_self": (outer_self, lambda x: x[..., :, None] * x[..., None, :], ((2, 3, 4),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equal_to_the_plain_product_in_value_and_every_autodiff_mode(name):
  fn, plain, shapes = CASES[name]
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    args = [jnp.asarray(rng.normal(size=s)) for s in shapes]
    np.testing.assert_array_equal(fn(*args), plain(*args))
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    argnums = tuple(range(len(args)))
    for got, want in zip(jax.grad(loss(fn), argnums)(*args),
                         jax.grad(loss(plain), argnums)(*args)):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for got, want in zip(jax.jacfwd(fn, argnums)(*args), jax.jacfwd(plain, argnums)(*args)):
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    hess = jax.hessian(lambda x: jnp.sum(fn(x, *args[1:]) ** 3))(args[0])
    want = jax.hessian(lambda x: jnp.sum(plain(x, *args[1:]) ** 3))(args[0])
    np.testing.assert_allclose(hess, want, rtol=1e-10, atol=1e-10)
