"""Tests for `dca_jax.apply_rotary` and `dca_jax.rotary_frequencies` (`dca_jax/ops/rotary.py`)
against the float64 oracle `oracles.rotary`."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dca_jax import apply_rotary, rotary_frequencies
from oracles import normal, rotary


def test_rotary_matches_float64_reference():
  x = normal((2, 7, 3, 16))
  positions = jnp.asarray([[0, 1, 2, 5, 11, 100, 1000], [3, 3, 4, 9, 0, 70, 2]])
  got = apply_rotary(x, positions)
  expected = np.stack([rotary(np.asarray(x[b], np.float64), np.asarray(positions[b], np.float64))
                       for b in range(2)])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  # Float positions and a shared [T] position vector work the same way.
  chex.assert_trees_all_close(apply_rotary(x, positions[0].astype(jnp.float32)),
                              apply_rotary(x, jnp.broadcast_to(positions[0], (2, 7))), atol=1e-6)
  np.testing.assert_allclose(rotary_frequencies(16), 10000.0 ** (-np.arange(0, 16, 2) / 16), rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(0, 2000), s=st.integers(0, 2000), shift=st.integers(-500, 500),
       seed=st.integers(0, 2 ** 16))
def test_rotary_scores_depend_on_offset_only(p, s, shift, seed):
  q, k = np.asarray(normal((2, 1, 1, 16), seed=seed))
  shift = max(shift, -min(p, s))
  score = lambda a, b: float(jnp.sum(apply_rotary(jnp.asarray(q), jnp.asarray([a]))
                                     * apply_rotary(jnp.asarray(k), jnp.asarray([b]))))
  # The float64 value of rot(q, p) . rot(k, s) = q . rot(k, s - p).
  exact = float(np.sum(q[0, 0] * rotary(k[0].astype(np.float64), np.asarray([s - p], np.float64))))
  scale = np.linalg.norm(q) * np.linalg.norm(k)
  # float32 angles carry ~position * 2^-24 rad of error (documented in apply_rotary).
  assert abs(score(p, s) - exact) <= 1e-5 * scale * (1 + max(p, s))
  assert abs(score(p + shift, s + shift) - exact) <= 1e-5 * scale * (1 + max(p, s) + abs(shift))


def test_rotary_preserves_norm_and_dtype():
  x = normal((4, 9, 2, 8))
  positions = np.random.default_rng(3).integers(0, 10_000, (4, 9))
  y = apply_rotary(x, positions)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  assert apply_rotary(x.astype(jnp.bfloat16), positions).dtype == jnp.bfloat16
  # Position 0 is the identity.
  chex.assert_trees_all_close(apply_rotary(x, jnp.zeros(9, jnp.int32)), x)


def test_rotary_errors():
  x = normal((2, 5, 3, 8))
  with pytest.raises(ValueError, match="x must have an even last dim"):
    apply_rotary(x[..., :7], jnp.arange(5))
  with pytest.raises(ValueError, match="positions must have shape"):
    apply_rotary(x, jnp.arange(4))
  with pytest.raises(ValueError, match="leading dims"):
    apply_rotary(x, jnp.zeros((3, 5)))
  with pytest.raises(ValueError, match="rank >= 3"):
    apply_rotary(x[0, 0], jnp.arange(3))
  with pytest.raises(TypeError, match="positions must have an integer or floating dtype"):
    apply_rotary(x, jnp.ones(5, bool))


def test_rotary_phase_matches_the_angles_and_stays_exact_far_out():
  """`rotary_phase` gives cos/sin of p f_i (float64 reference) for small p; far out (p ~ 2e9,
  where float32 angles are meaningless) a query and a key rotated at their absolute positions
  still meet at their relative angle, and a rotation by -p undoes one by p."""
  from dca_jax.ops.rotary import rotary_phase, rotate_pairs
  dim, base = 16, 10000.0
  freqs = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  positions = np.array([0, 1, 7, 1000, 123457])
  cos, sin = rotary_phase(jnp.asarray(positions), dim, base)
  # The documented bound: 7.3e-10 rad per unit of position (f_i rounded to 2^-32 turn) plus the
  # float32 cos/sin.
  bound = 1e-6 + positions[:, None] * 7.4e-10
  assert np.all(np.abs(cos - np.cos(positions[:, None] * freqs)) <= bound)
  assert np.all(np.abs(sin - np.sin(positions[:, None] * freqs)) <= bound)

  q, k = (jax.random.normal(jax.random.key(i), (dim,)) for i in range(2))
  far = 2_000_000_000
  for offset in (0, 5, 63):
    (cq, sq), (ck, sk) = rotary_phase(far + offset, dim, base), rotary_phase(far, dim, base)
    got = jnp.dot(rotate_pairs(q, cq, sq), rotate_pairs(k, ck, sk))
    c0, s0 = rotary_phase(offset, dim, base)
    want = jnp.dot(rotate_pairs(q, c0, s0), k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  c, s = rotary_phase(far, dim, base)
  cb, sb = rotary_phase(-far, dim, base)
  np.testing.assert_allclose(rotate_pairs(rotate_pairs(q, c, s), cb, sb), q, atol=1e-5)


def test_numpy_positions_make_constant_tables_with_the_same_rotation():
  """Positions known when tracing (NumPy) give cos and sin as constants of the program (no
  cosine left to fuse and recompute per element) and the same rotation, forward and gradient,
  up to the float32 rounding of cos and sin; beyond STATIC_TABLE_MAX the program computes them."""
  from dca_jax.ops import rotary as rotary_lib
  x = normal((2, 37, 3, 8))
  positions = np.arange(100, 137, dtype=np.int32)
  loss = lambda x, p: jnp.sum(jnp.sin(apply_rotary(x, p, base=500.0)))
  for a, b in zip((apply_rotary(x, positions, base=500.0), jax.grad(loss)(x, positions)),
                  (apply_rotary(x, jnp.asarray(positions), base=500.0),
                   jax.grad(loss)(x, jnp.asarray(positions)))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  hlo = jax.jit(lambda x: apply_rotary(x, positions)).lower(x).as_text()
  assert "cosine" not in hlo
  assert "cosine" in jax.jit(lambda x, p: apply_rotary(x, p)).lower(x, positions).as_text()
  big = np.arange(2 * rotary_lib.STATIC_TABLE_MAX // 4 + 1, dtype=np.int32)   # K/2 = 4 per row
  assert "cosine" in jax.jit(lambda x: apply_rotary(x, big)).lower(
      jax.ShapeDtypeStruct((1, big.size, 1, 8), jnp.float32)).as_text()
