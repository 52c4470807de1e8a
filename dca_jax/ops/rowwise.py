"""Row-wise products whose gradients are matrix products: `scale_rows`, `row_dot`, `outer_self`.

Reverse-mode autodiff of a broadcasting product, x * s[..., None], gives the gradient with
respect to s as a reduce-of-multiply over the last axis, and so does sum(x * y, -1). XLA:CPU
(jax 0.10.2) hands those reductions to YNNPACK's reduction, which is slow for many short rows:
845 us to sum [1, 1024, 4, 64] -> [1, 1024, 4] against 107 us for the same sum as an einsum
(`python -m experiments.rowwise_study --out docs/rowwise_study.json`, 2-core Intel Xeon,
2026-12-05, the recorded run). In DCA's
forward+backward at T = 1024 such reductions (the memory's decays into and out of each chunk, the
feature map's products, the read-out's normaliser) were about a third of the time
(`python -m experiments.profile_ops --layers dca --lengths 1024`: 30.5 ms at commit 2765e58,
before these functions, 20.8 ms with them, same machine and day).

The functions here evaluate the plain product (what jax2onnx and every backend see when the
function is only evaluated) and carry a `custom_jvp` whose tangent is written with einsums:
forward mode (jvp, jacfwd) uses it as it is, and reverse mode transposes it into dot_generals.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Full float32 precision for the tangents: on TPU (and GPU with TF32) a default-precision
# einsum rounds its inputs, where the plain products it stands for would not.
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


@jax.custom_jvp
def scale_rows(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x [..., K] times one factor per row, scale [...]: x * scale[..., None]."""
  return x * scale[..., None]


@scale_rows.defjvp
def _scale_rows_jvp(primals, tangents):
  x, scale = primals
  dx, dscale = tangents
  out = scale_rows(x, scale)
  return out, dx * scale[..., None] + _einsum("...k,...->...k", x, dscale)


@jax.custom_jvp
def row_dot(x: jax.Array, y: jax.Array) -> jax.Array:
  """sum(x * y, -1) for x, y [..., K] -> [...]."""
  return jnp.sum(x * y, axis=-1)


@row_dot.defjvp
def _row_dot_jvp(primals, tangents):
  x, y = primals
  dx, dy = tangents
  return row_dot(x, y), (_einsum("...k,...k->...", dx, y)
                         + _einsum("...k,...k->...", x, dy))


@jax.custom_jvp
def outer_self(x: jax.Array) -> jax.Array:
  """x [..., K] -> x x^T [..., K, K] (a broadcasting product; its tangent is two einsums)."""
  return x[..., :, None] * x[..., None, :]


@outer_self.defjvp
def _outer_self_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return outer_self(x), (_einsum("...i,...j->...ij", dx, x)
                         + _einsum("...i,...j->...ij", x, dx))
