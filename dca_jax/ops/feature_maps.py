"""Positive feature maps phi for the compressed memory.

The compressed memory of DCA scores a query against a summary of old keys through a kernel
phi(p) . phi(p'), where p, p' are learned projections of the query and key (no positions). The
Taylor map gives 1 + u + u^2 / 2 with u = p . p' / sqrt(P): exp-like near u = 0 but not monotone
(5.0 at u = -4, where exp gives 0.018), so it is a kernel of its own, not an approximation of the
window's softmax. It must be positive (it enters the same normaliser as the exact softmax scores
of the window) and cheap (docs/theory.md, section 5).
"""

from __future__ import annotations

import enum
import math

import jax
import jax.numpy as jnp
import numpy as np

from dca_jax.ops import _checks
from dca_jax.ops.rowwise import outer_self


class FeatureMap(str, enum.Enum):
  """Feature maps for the compressed memory."""

  TAYLOR = "taylor"      # 2nd-order Taylor expansion of exp (Based, Arora et al. 2024)
  ELU = "elu"            # elu(x) + 1 (Katharopoulos et al. 2020)

  @classmethod
  def parse(cls, value: "FeatureMap | str") -> "FeatureMap":
    return _checks.parse_choice(cls, value, "feature_map")


def feature_dim(kind: FeatureMap | str, dim: int) -> int:
  """Number of features F that `feature_map(kind, x)` returns for inputs of size `dim`.

  Raises:
    ValueError: an unknown kind, or dim not an integer >= 1 (named `feature_dim`, the option
      that sets it in `DCAttention` and `init_params`).
  """
  kind = FeatureMap.parse(kind)
  _checks.check_positive_int("feature_dim", dim)
  if kind is FeatureMap.TAYLOR:
    return 1 + dim + dim * (dim + 1) // 2
  return dim


def taylor_features(x):
  """Second-order Taylor features: phi(x) . phi(y) = 1 + u + u^2 / 2 with u = x . y / sqrt(d).

  The kernel 1 + u + u^2/2 >= 1/2 for every u, so it is strictly positive, and it matches
  exp(u) to second order around u = 0 (u: the letter of docs/theory.md, section 5).

  Args:
    x: [..., d] inputs (d is small: the features grow as d^2 / 2).

  Returns:
    [..., 1 + d + d (d + 1) / 2] float features, in x's dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> x, y = jnp.array([0.3, -0.2]), jnp.array([0.1, 0.5])
    >>> u = x @ y / jnp.sqrt(2.0)
    >>> bool(jnp.allclose(taylor_features(x) @ taylor_features(y), 1 + u + u**2 / 2))
    True

  References:
    Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
    tradeoff" (Based), sec. 3.2.
  """
  dim = x.shape[-1]
  parts = [jnp.ones(x.shape[:-1] + (1,), x.dtype), x / dim ** 0.25]
  # Row i of the upper triangle of x x^T: x_i * x_{i..d-1}. Off-diagonal products appear twice in
  # (x x^T) . (y y^T); weighting them by sqrt(2) once in each feature vector keeps the dot product
  # exact with only the upper triangle stored. Static slices rather than a gather, whose gradient
  # is a scatter-add, or a selection matmul, which multiplies d^2 products by a mostly-zero matrix.
  # The outer product is rowwise.outer_self: a broadcasting product whose gradient is a batched
  # matrix-vector product (dot_general). The rows as x[..., i:i+1] * x[..., i:] gave d small
  # reduce-of-multiply ops in the backward, which XLA:CPU (jax 0.10.2) runs in YNNPACK's slow
  # reduction (dca_jax.ops.rowwise).
  outer = outer_self(x)
  for i in range(dim):
    weight = np.where(np.arange(i, dim) == i, 1.0, math.sqrt(2.0)) / math.sqrt(2.0 * dim)
    parts.append(outer[..., i, i:] * jnp.asarray(weight, x.dtype))
  return jnp.concatenate(parts, axis=-1)


def elu_features(x):
  """elu(x) + 1: positive, Katharopoulos et al. 2020 ("Transformers are RNNs"), sec. 3.2."""
  return jax.nn.elu(x) + 1.0


def feature_map(kind: FeatureMap | str, x):
  """Applies the feature map `kind` to the last axis of `x`."""
  kind = FeatureMap.parse(kind)
  if kind is FeatureMap.TAYLOR:
    return taylor_features(x)
  return elu_features(x)
