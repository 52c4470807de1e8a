"""Projections y = x W written so that their weight gradient takes XLA's fast matmul path on CPU.

Reverse-mode autodiff of `x @ W` (x [..., D], W [D, N]) asks for the weight gradient
dW = x^T dy. JAX emits it as the transpose of a product of dy and x, and XLA's CPU backend
(jax 0.10.2) then copies dy into an [N, M] layout (M = the rows of x) and runs a `dot` that
contracts x's rows against dy's columns, which runs off the fast (YNNPACK) path.

`project` computes the same function with a `custom_jvp` whose weight term is written as
(dW^T x^T)^T: its transpose, the weight gradient, is then one `dot_general` contracting the rows
of x and dy, which XLA runs without a copy. Measured by `python -m experiments.projection_study`
(2-core AMD EPYC, AVX2, 2026-12-04, fwd+bwd medians, plain autodiff / `project`): one [T, 256] x
[256, 832] projection 1.52x at T = 1024 and 1.77x at 8192 (206 against 117 ms); the layers
(d_model 256, 4 heads) at T = 1024 / 8192: DCA 1.10 / 1.08, GLA 1.25 / 1.28, sliding window
1.08 / 1.07, Gated DeltaNet 1.13 / 1.11, linear 1.28 / 1.22, softmax 1.00 at 1024 (its T x T
scores dominate).

Forward mode (jvp, jacfwd) works as for any JAX function, because the rule is a JVP.
`dot_general` has `jax.lax.dot_general`'s signature, for `flax.nnx.Linear(dot_general=...)`: it
routes a projection of the last axis by a 2-D kernel through `project`, anything else to
`jax.lax.dot_general`. Every layer's projections, the LM's MLP and its head use it.
"""

from __future__ import annotations

import functools

import jax
from jax.custom_derivatives import SymbolicZero


def _product(x, w, precision, preferred_element_type):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def project(x, w, precision=None, preferred_element_type=None):
  """x [..., D] @ w [D, N] -> [..., N], with a weight gradient on XLA's fast CPU path.

  Args:
    x: [..., D] inputs.
    w: [D, N] weights.
    precision, preferred_element_type: as in `jax.lax.dot_general`.

  Returns:
    [..., N], exactly `jax.lax.dot_general(x, w, contracting x's last axis with w's first)`.

  Example:
    >>> import jax.numpy as jnp
    >>> project(jnp.ones((2, 3, 4)), jnp.ones((4, 5))).shape
    (2, 3, 5)
  """
  return _product(x, w, precision, preferred_element_type)


project.defjvp(lambda *args: _project_jvp(*args), symbolic_zeros=True)


def _project_jvp(precision, preferred_element_type, primals, tangents):
  x, w = primals
  dx, dw = tangents
  y = _product(x, w, precision, preferred_element_type)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(_product(dx, w, precision, preferred_element_type))
  if not isinstance(dw, SymbolicZero):
    # x dW as (dW^T x^T)^T: [N, M] from contracting dW's rows with x's last axis, transposed.
    rows = x.reshape(-1, x.shape[-1])
    by_weight = jax.lax.dot_general(dw, rows, (((0,), (1,)), ((), ())), precision=precision,
                                    preferred_element_type=preferred_element_type)
    terms.append(by_weight.T.reshape(y.shape))
  if not terms:
    return y, SymbolicZero(jax.typeof(y).to_tangent_aval())
  return y, sum(terms[1:], terms[0])


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
  """`jax.lax.dot_general`, through `project` when it is a projection of lhs's last axis by a
  2-D rhs (the products of `flax.nnx.Linear`)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  if (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not lhs_batch and not rhs_batch and kwargs.get("out_sharding") is None):
    return project(lhs, rhs, precision, preferred_element_type)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)
