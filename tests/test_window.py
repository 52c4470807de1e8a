"""Tests for `dca_jax.ops.window.sliding_window_attention` against a float64 NumPy oracle
(`oracles.window_attention`) and, for gradients, its float64 JAX twin."""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from dca_jax import sliding_window_attention, window_softmax_parts
from oracles import window_attention, window_attention_dense

# Tolerances of the float32 kernel against the float64 oracle, and of low-precision kernels
# against the float32 kernel run on the same (already rounded) inputs: only the output rounding
# differs, about 2^-8 relative for bfloat16 and 2^-11 for float16.
_TOL = {
    jnp.float32: dict(atol=2e-5, rtol=2e-5),
    jnp.bfloat16: dict(atol=2e-2, rtol=2e-2),
    jnp.float16: dict(atol=3e-3, rtol=3e-3),
}


def _inputs(seed, batch, time, heads, key_dim, value_dim, reset_prob=0.0):
  """Fresh float32 normal q, k, v and, when reset_prob > 0, a random reset mask (else None)."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, time, heads, key_dim)).astype(np.float32)
  k = rng.normal(size=(batch, time, heads, key_dim)).astype(np.float32)
  v = rng.normal(size=(batch, time, heads, value_dim)).astype(np.float32)
  reset = rng.random((batch, time)) < reset_prob if reset_prob else None
  return q, k, v, reset


# Jitted so that each shape compiles once, instead of op by op (eager dispatch dominates the run
# time of this file otherwise).
_swa_jit = jax.jit(sliding_window_attention, static_argnames=("window", "scale"))


def _swa(q, k, v, window, scale=None, reset=None):
  return _swa_jit(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window, scale=scale,
      reset=None if reset is None else jnp.asarray(reset))


# ---------------------------------------------------------------------------------------------
# Values against the oracle.


@hypothesis.settings(max_examples=oracles.draws(12), deadline=None)
@hypothesis.given(
    batch=st.integers(1, 2),
    time=st.sampled_from([1, 2, 3, 7, 13, 31, 32, 33, 64, 97]),
    heads=st.integers(1, 3),
    key_dim=st.integers(1, 9),
    value_dim=st.integers(1, 9),
    window=st.sampled_from([1, 2, 5, 16, 32, 100, 1000]),
    reset_prob=st.sampled_from([0.0, 0.1, 0.5]),
    scale=st.sampled_from([None, 0.3, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_oracle(batch, time, heads, key_dim, value_dim, window, reset_prob, scale, seed):
  q, k, v, reset = _inputs(seed, batch, time, heads, key_dim, value_dim, reset_prob)
  out = _swa(q, k, v, window, scale, reset)
  assert out.shape == (batch, time, heads, value_dim)
  assert out.dtype == jnp.float32
  chex.assert_trees_all_close(np.asarray(out), window_attention(q, k, v, window, scale, reset),
                              **_TOL[jnp.float32])


@pytest.mark.parametrize(
    "time, window",
    [
        (1, 1),  # one token
        (13, 1),  # prime T, window of the token itself
        (13, 4),  # T not a multiple of the block
        (5, 9),  # T < window
        (64, 16),  # T a multiple of the block
        (100, 7),
    ],
)
@pytest.mark.parametrize("reset_prob", [0.0, 0.2])
def test_awkward_shapes(time, window, reset_prob):
  # An all-false reset array is the no-reset case; it shares the compiled program.
  q, k, v, _ = _inputs(time * 31 + window, 2, time, 2, 6, 3)
  reset = np.random.default_rng(time).random((2, time)) < reset_prob
  chex.assert_trees_all_close(np.asarray(_swa(q, k, v, window, reset=reset)),
                              window_attention(q, k, v, window, reset=reset), **_TOL[jnp.float32])


def test_window_one_returns_values():
  q, k, v, _ = _inputs(0, 2, 11, 3, 4, 5)
  chex.assert_trees_all_close(np.asarray(_swa(q, k, v, 1)), v, atol=1e-6)


@pytest.mark.parametrize("time, window", [(17, 17), (17, 40)])
def test_full_window_is_causal_attention(time, window):
  q, k, v, _ = _inputs(time, 2, time, 3, 8, 8)
  expected = jax.jit(jax.nn.dot_product_attention, static_argnames="is_causal")(
      q, k, v, is_causal=True)
  out = _swa(q, k, v, window)
  chex.assert_trees_all_close(out, expected, **_TOL[jnp.float32])
  chex.assert_trees_all_close(np.asarray(out), window_attention(q, k, v, time), **_TOL[jnp.float32])


def test_reset_equals_separate_documents():
  lengths = [6, 1, 6]  # documents longer than the window, and one of a single token
  q, k, v, _ = _inputs(3, 1, sum(lengths), 2, 4, 3)
  reset = np.zeros((1, sum(lengths)), bool)
  reset[0, np.cumsum(lengths)[:-1]] = True
  packed = np.asarray(_swa(q, k, v, 4, reset=reset))
  start = 0
  for n in lengths:
    part = slice(start, start + n)
    alone = _swa(q[:, part], k[:, part], v[:, part], 4)
    chex.assert_trees_all_close(packed[:, part], np.asarray(alone), **_TOL[jnp.float32])
    start += n


@pytest.mark.parametrize("window, block", [(4, 5), (7, 40), (1, 3)])
def test_any_block_size_at_least_the_window_agrees(window, block):
  # The public function always takes P = W; larger blocks exercise the masks in other positions.
  q, k, v, reset = _inputs(block, 2, 37, 2, 5, 3, 0.15)
  def blocked(q, k, v, reset):
    doc = jnp.cumsum(reset, axis=1, dtype=jnp.int32)
    num, den, _ = window_softmax_parts(q, k, v, window=window, scale=0.5, doc=doc,
                                                  block_size=block)
    return num / den[..., None]

  out = jax.jit(blocked)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(reset))
  chex.assert_trees_all_close(np.asarray(out), window_attention(q, k, v, window, 0.5, reset),
                              **_TOL[jnp.float32])


# ---------------------------------------------------------------------------------------------
# Gradients against a float64 dense reference.


@pytest.mark.parametrize("time, window, with_reset", [(1, 1, False), (37, 8, True), (9, 50, False)])
def test_gradients_match_float64_reference(time, window, with_reset):
  q, k, v, reset = _inputs(time + window, 2, time, 2, 5, 3, 0.2 if with_reset else 0.0)
  reset = np.zeros((2, time), bool) if reset is None else reset
  cotangent = np.random.default_rng(1).normal(size=v.shape[:3] + (3,))

  def loss(fn, dtype):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.asarray(cotangent, dtype))

  ours = jax.jit(jax.grad(loss(lambda q, k, v: sliding_window_attention(
      q, k, v, window=window, reset=jnp.asarray(reset)), jnp.float32), argnums=(0, 1, 2)))
  grads = jax.tree.map(np.asarray, ours(*(jnp.asarray(x) for x in (q, k, v))))
  with jax.enable_x64(True):
    x64 = [jnp.asarray(x, jnp.float64) for x in (q, k, v)]
    reference = jax.jit(jax.grad(loss(lambda q, k, v: window_attention_dense(
        q, k, v, window, jnp.asarray(reset)), jnp.float64), argnums=(0, 1, 2)))(*x64)
    ours64 = jax.jit(jax.grad(loss(lambda q, k, v: sliding_window_attention(
        q, k, v, window=window, reset=jnp.asarray(reset)), jnp.float64), argnums=(0, 1, 2)))(*x64)
    assert all(g.dtype == jnp.float64 for g in ours64)
    chex.assert_trees_all_close(ours64, reference, atol=1e-10, rtol=1e-10)
    reference = jax.tree.map(np.asarray, reference)
  chex.assert_trees_all_close(grads, reference, atol=1e-4, rtol=1e-4)
  assert all(np.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# Low precision and stability.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("reset_prob", [0.0, 0.1])
def test_low_precision_matches_float32(dtype, reset_prob):
  q, k, v, _ = _inputs(7, 2, 45, 3, 16, 8)
  reset = np.random.default_rng(0).random((2, 45)) < reset_prob
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  out = _swa(q, k, v, 8, reset=reset)
  assert out.dtype == dtype
  assert jnp.isfinite(out.astype(jnp.float32)).all()
  expected = _swa(*(x.astype(jnp.float32) for x in (q, k, v)), 8, reset=reset)
  chex.assert_trees_all_close(out.astype(jnp.float32), expected, **_TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_large_scores_are_stable(dtype):
  q, k, v, reset = _inputs(11, 1, 40, 2, 16, 4, 0.1)
  q = q * 100.0  # scores of order 1e3: a softmax without max subtraction overflows
  out = _swa(jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), 8, reset=reset)
  assert out.dtype == dtype
  assert jnp.isfinite(out.astype(jnp.float32)).all()
  if dtype == jnp.float32:
    chex.assert_trees_all_close(np.asarray(out), window_attention(q, k, v, 8, reset=reset), atol=1e-3)
    grads = jax.jit(jax.grad(lambda q: sliding_window_attention(
        q, jnp.asarray(k), jnp.asarray(v), window=8).sum()))(jnp.asarray(q))
    assert jnp.isfinite(grads).all()


# ---------------------------------------------------------------------------------------------
# Transformations.


def test_jit_matches_eager_and_traces_once():
  q, k, v, reset = _inputs(5, 2, 29, 2, 4, 6, 0.2)
  args = [jnp.asarray(x) for x in (q, k, v, reset)]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(q, k, v, reset):
    return sliding_window_attention(q, k, v, window=6, reset=reset)

  eager = sliding_window_attention(*args[:3], window=6, reset=args[3])
  chex.assert_trees_all_close(fn(*args), eager, atol=1e-6)
  shifted = [x + 1 for x in args[:3]] + args[3:]
  chex.assert_trees_all_close(fn(*shifted), window_attention(q + 1, k + 1, v + 1, 6, reset=reset),
                              atol=1e-5)


def test_vmap_matches_loop():
  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(3, 2, 21, 2, 4)).astype(np.float32) for _ in range(3))
  reset = rng.random((3, 2, 21)) < 0.2
  mapped = jax.jit(jax.vmap(lambda q, k, v, r: sliding_window_attention(
      q, k, v, window=5, reset=r)))(q, k, v, reset)
  looped = jnp.stack([_swa(q[i], k[i], v[i], 5, reset=reset[i]) for i in range(3)])
  chex.assert_trees_all_close(mapped, looped, atol=1e-6)
  # vmap over heads: the function sees one head at a time, as [B, T, 1, K].
  per_head = jax.jit(jax.vmap(
      lambda q, k, v: sliding_window_attention(q, k, v, window=5, reset=jnp.asarray(reset[0])),
      in_axes=2, out_axes=2))(*(x[0][:, :, :, None] for x in (q, k, v)))
  chex.assert_trees_all_close(per_head[:, :, :, 0], looped[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Input checks.


def _bad_call(case):
  q = jnp.ones((2, 10, 3, 4))
  v = jnp.ones((2, 10, 3, 5))
  kwargs = dict(q=q, k=q, v=v, window=4, reset=None)
  kwargs.update(case)
  return lambda: sliding_window_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"),
                                          **kwargs)


@pytest.mark.parametrize(
    "case, error, match",
    [
        (dict(q=jnp.ones((2, 10, 4))), ValueError, "q must have rank 4"),
        (dict(k=jnp.ones((2, 10, 3, 4, 1))), ValueError, "k must have rank 4"),
        (dict(v=jnp.ones((10, 3, 5))), ValueError, "v must have rank 4"),
        (dict(q=np.ones((2, 10, 3, 4), np.int32)), TypeError, "q must have a floating dtype"),
        (dict(k=[[1.0]]), TypeError, "k must be an array"),
        (dict(k=jnp.ones((3, 10, 3, 4))), ValueError, "k has batch size"),
        (dict(v=jnp.ones((2, 11, 3, 5))), ValueError, "v has length T"),
        (dict(k=jnp.ones((2, 10, 2, 4))), ValueError, "k has head count"),
        (dict(k=jnp.ones((2, 10, 3, 5))), ValueError, "k has key dim"),
        (dict(window=0), ValueError, "window"),
        (dict(window=-3), ValueError, "window"),
        (dict(window=2.0), ValueError, "window"),
        (dict(window=True), ValueError, "window"),
        (dict(window=None), ValueError, "window"),
        (dict(reset=jnp.zeros((2, 9), bool)), ValueError, "reset must have shape"),
        (dict(reset=jnp.zeros((2, 10, 1), bool)), ValueError, "reset must have shape"),
        (dict(reset=jnp.zeros((2, 10), jnp.int32)), TypeError, "reset must have dtype bool"),
        (dict(reset=[[True] * 10] * 2), TypeError, "reset must be a boolean array"),
    ],
)
def test_bad_inputs_name_the_argument(case, error, match):
  with pytest.raises(error, match=match):
    _bad_call(case)()


# ---------------------------------------------------------------------------------------------
# Complexity: memory linear in T, never a T x T matrix.


@pytest.mark.parametrize("differentiate", oracles.ci_cases([False, True], keep=(1,)))
def test_memory_is_linear_in_time(differentiate):
  batch, heads, dim, window = 1, 2, 16, 32

  def temp_bytes(time):
    x = jax.ShapeDtypeStruct((batch, time, heads, dim), jnp.float32)
    reset = jax.ShapeDtypeStruct((batch, time), jnp.bool_)
    fn = lambda q, k, v, r: sliding_window_attention(q, k, v, window=window, reset=r)
    if differentiate:
      fn = jax.grad(lambda q, k, v, r: sliding_window_attention(
          q, k, v, window=window, reset=r).sum(), argnums=(0, 1, 2))
    compiled = jax.jit(fn).lower(x, x, x, reset).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(2048), temp_bytes(4096)
  assert large <= 2.5 * small, (small, large)
  dense_scores = batch * heads * 4096 * 4096 * 4
  assert large < dense_scores / 8, (large, dense_scores)
