"""Tests for `dca_jax.ops.feature_maps`: the positive kernels of DCA's compressed memory."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax import FeatureMap, elu_features, feature_dim, feature_map, taylor_features

_taylor = jax.jit(taylor_features)
_elu = jax.jit(elu_features)


def _vectors(dim, scale):
  floats = st.floats(-scale, scale, allow_nan=False, allow_infinity=False, width=32)
  return st.lists(floats, min_size=dim, max_size=dim).map(lambda v: np.asarray(v, np.float32))


@st.composite
def _pairs(draw, max_dim=8, scale=4.0):
  dim = draw(st.integers(1, max_dim))
  return draw(_vectors(dim, scale)), draw(_vectors(dim, scale))


@hypothesis.settings(max_examples=30, deadline=None, derandomize=True)
@hypothesis.given(_pairs())
def test_taylor_kernel_is_second_order_exp(pair):
  x, y = pair
  s = float(np.dot(x.astype(np.float64), y.astype(np.float64)) / np.sqrt(x.size))
  kernel = float(jnp.dot(_taylor(x), _taylor(y)))
  expected = 1.0 + s + s * s / 2.0
  assert kernel == pytest.approx(expected, rel=1e-5, abs=1e-5 * (1.0 + abs(s) + s * s))
  # 1 + s + s^2/2 = ((1 + s)^2 + 1) / 2 >= 1/2: the kernel is positive whatever the inputs.
  assert kernel >= 0.5 - 1e-5 * (1.0 + abs(s) + s * s)


def test_taylor_kernel_minimum_is_one_half():
  """At s = -1 the kernel reaches its minimum 1/2 (x = -y with |x|^2 = sqrt(d))."""
  dim = 4
  x = np.full(dim, dim ** 0.25 / np.sqrt(dim), np.float32)
  kernel = float(jnp.dot(_taylor(x), _taylor(-x)))
  assert kernel == pytest.approx(0.5, abs=1e-6)


def test_taylor_features_batched_shapes_and_dtype():
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6))
  y = jax.random.normal(jax.random.key(1), (2, 3, 5, 6))
  fx, fy = _taylor(x), _taylor(y)
  assert fx.shape == (2, 3, 5, feature_dim("taylor", 6)) and fx.dtype == jnp.float32
  s = np.einsum("...d,...d->...", np.asarray(x, np.float64), np.asarray(y, np.float64)) / np.sqrt(6)
  np.testing.assert_allclose(np.sum(np.asarray(fx) * np.asarray(fy), -1), 1 + s + s * s / 2,
                             rtol=1e-5, atol=1e-5)
  assert _taylor(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
@hypothesis.given(_vectors(7, 10.0))
def test_elu_features_positive(x):
  phi = np.asarray(_elu(x))
  assert np.all(phi > 0)
  np.testing.assert_allclose(phi, np.where(x > 0, x + 1.0, np.exp(x.astype(np.float64))),
                             rtol=1e-5, atol=1e-6)


def test_elu_features_never_negative():
  x = jnp.array([-1e4, -100.0, -20.0, -1.0, 0.0, 1.0, 1e4])
  assert np.all(np.asarray(_elu(x)) >= 0)


@pytest.mark.parametrize("dim", [1, 2, 5, 16])
def test_feature_dim_formula(dim):
  assert feature_dim("taylor", dim) == 1 + dim + dim * (dim + 1) // 2
  assert feature_dim(FeatureMap.TAYLOR, dim) == feature_dim("taylor", dim)
  assert feature_dim("elu", dim) == dim
  x = jax.ShapeDtypeStruct((3, dim), jnp.float32)
  for kind in ("taylor", "elu"):
    assert jax.eval_shape(lambda x: feature_map(kind, x), x).shape == (3, feature_dim(kind, dim))


def test_feature_map_dispatch():
  assert feature_dim("taylor", 16) == 153
  assert feature_dim("taylor", 8) == 45     # the layer's default F (P = 8)
  x = jax.random.normal(jax.random.key(2), (4, 3))
  np.testing.assert_array_equal(np.asarray(feature_map("taylor", x)),
                                np.asarray(taylor_features(x)))
  np.testing.assert_array_equal(np.asarray(feature_map(FeatureMap.ELU, x)),
                                np.asarray(elu_features(x)))


@pytest.mark.parametrize("kind", ["relu", "Taylor", "", None, 3])
def test_unknown_kind_raises(kind):
  with pytest.raises(ValueError, match="feature_map"):
    feature_map(kind, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="feature_map"):
    feature_dim(kind, 3)
  with pytest.raises(ValueError, match="feature_map"):
    FeatureMap.parse(kind)
