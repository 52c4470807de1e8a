"""Tests for `dca_jax.flops`: exact counts, loops, control flow, and agreement with XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.extend.core import Primitive

from dca_jax import flops
from dca_jax.flops import FlopCount, count_flops, count_jaxpr

F32 = jnp.float32


def _spec(*shape):
  return jax.ShapeDtypeStruct(shape, F32)


def _xla_cost(fn, *args):
  """XLA's cost analysis of `fn` (CPU here), as a dict; older jax returned a list of dicts.

  Compiling for shapes alone is enough: costs depend on shapes, never on values.
  """
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {key: int(cost.get(key, 0)) for key in ("flops", "transcendentals")}


# FlopCount arithmetic.


def test_flopcount_add_and_int_multiply():
  a, b = FlopCount(10, 8, 1), FlopCount(3, 0, 2)
  assert a + b == FlopCount(13, 8, 3)
  assert a * 4 == FlopCount(40, 32, 4)
  assert 4 * a == FlopCount(40, 32, 4)
  assert a * np.int64(2) == FlopCount(20, 16, 2)
  assert sum([a, b]) == FlopCount(13, 8, 3)
  with pytest.raises(TypeError):
    _ = a * 1.5
  with pytest.raises(TypeError):
    _ = a + 1


def test_count_jaxpr_rejects_non_jaxpr():
  with pytest.raises(TypeError, match="ClosedJaxpr"):
    count_jaxpr(lambda x: x)


def test_count_jaxpr_accepts_open_and_closed_jaxpr():
  closed = jax.make_jaxpr(lambda x, w: jnp.tanh(x @ w))(_spec(3, 4), _spec(4, 5))
  expected = FlopCount(2 * 3 * 5 * 4 + 15, 2 * 3 * 5 * 4, 15)
  assert count_jaxpr(closed) == expected
  assert count_jaxpr(closed.jaxpr) == expected


# Matmuls and convolutions.


def test_matmul_is_exactly_2mnk():
  m, k, n = 7, 13, 5
  got = count_flops(lambda x, w: x @ w, _spec(m, k), _spec(k, n))
  assert got == FlopCount(2 * m * n * k, 2 * m * n * k, 0)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 4), h=st.integers(1, 3), m=st.integers(1, 9), k=st.integers(1, 9),
       n=st.integers(1, 9))
def test_batched_einsum_counts_batch_times_2mnk(b, h, m, k, n):
  got = count_flops(lambda q, kk: jnp.einsum("bhmk,bhnk->bhmn", q, kk), _spec(b, h, m, k),
                    _spec(b, h, n, k))
  assert got.matmul_flops == got.flops == 2 * b * h * m * n * k


def test_einsum_with_two_contracted_dims():
  got = count_flops(lambda a, w: jnp.einsum("bij,ijo->bo", a, w), _spec(3, 4, 5), _spec(4, 5, 6))
  assert got.matmul_flops == 2 * 3 * 6 * (4 * 5)


def test_conv_dense_count_and_valid_conv_matches_xla():
  x, k = _spec(2, 3, 9, 9), _spec(4, 3, 3, 3)  # NCHW, OIHW.
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "VALID")
  got = count_flops(conv, x, k)
  expected = 2 * (2 * 4 * 7 * 7) * (3 * 3 * 3)
  assert got == FlopCount(expected, expected, 0)
  assert _xla_cost(conv, x, k)["flops"] == expected


def test_grouped_conv_divides_by_feature_groups():
  conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", feature_group_count=2)
  got = count_flops(conv, _spec(1, 6, 8, 8), _spec(4, 3, 3, 3))  # 6 in features, 2 groups.
  assert got.matmul_flops == 2 * (1 * 4 * 8 * 8) * (3 * 3 * 6 // 2)


# Elementwise ops, reductions, data movement.


def test_elementwise_chain_counts_one_per_element():
  def f(x, y):
    z = x * y + 1.0  # 2
    z = jnp.maximum(z, 0.0) - y / 3.0  # 3
    return jnp.exp(z) + jnp.tanh(y)  # 3, two of them transcendental

  got = count_flops(f, _spec(4, 6), _spec(4, 6))
  assert got == FlopCount(8 * 24, 0, 2 * 24)


def test_comparison_and_select_count_one_each():
  got = count_flops(lambda x: jnp.where(x > 0.5, x, 1.0), _spec(5, 7))
  assert got.flops == 2 * 35  # gt + select_n


def test_integer_pow_counts_binary_exponentiation_like_xla():
  x = _spec(8, 16)
  for y, muls in [(2, 1), (3, 2), (4, 2), (7, 4), (-2, 2)]:  # -2: a square and a reciprocal.
    fn = lambda x, y=y: lax.integer_pow(x, y)
    assert count_flops(fn, x).flops == muls * x.size, y
    assert _xla_cost(fn, x)["flops"] == muls * x.size, y  # Compiled apart: XLA would share x*x.


def test_reductions_count_one_per_input_element():
  x = _spec(6, 10)
  assert count_flops(lambda x: jnp.sum(x), x).flops == 60
  assert count_flops(lambda x: jnp.max(x, axis=1), x).flops == 60
  assert count_flops(lambda x: jnp.argmax(x, axis=0), x).flops == 60
  assert count_flops(lambda x: jnp.cumsum(x, axis=1), x).flops == 60
  assert count_flops(lambda x: lax.cumlogsumexp(x, axis=0), x).flops == 60


def test_data_movement_is_free():
  def f(x):
    y = jnp.concatenate([x.T, x.T], axis=0).reshape(-1)[::2]
    y = jnp.pad(y, (1, 2))[None, :, None]
    return y.astype(jnp.bfloat16), jnp.flip(x, 1), jnp.broadcast_to(x[:1], (3, 6)), y.squeeze()

  assert count_flops(f, _spec(4, 6)) == FlopCount()


def test_index_arithmetic_counts_but_the_move_does_not():
  # dynamic_slice itself is free; normalising the negative index costs lt, add, select_n.
  got = count_flops(lambda x, i: lax.dynamic_slice(x, (i,), (5,)), _spec(20),
                    jax.ShapeDtypeStruct((), jnp.int32))
  assert got.flops == 3


def test_scatter_add_counts_the_updates():
  got = count_flops(lambda x, u: x.at[jnp.array([1, 3, 3])].add(u), _spec(8, 5), _spec(3, 5))
  # Index normalisation (lt, add, select_n on 3 int32 indices) costs 3 * 3.
  assert got.flops == 3 * 5 + 3 * 3


def test_dead_code_is_not_counted():
  def f(x):
    _ = jnp.exp(x) @ x  # Never used: XLA deletes it, so must we.
    return x * 2.0

  assert count_flops(f, _spec(4, 4)) == FlopCount(16, 0, 0)


def test_dead_outputs_of_jit_and_scan_are_not_counted():
  def f(x):
    _, b = jax.jit(lambda x: (jnp.exp(x) @ x, x * 2.0))(x)
    return b

  assert count_flops(f, _spec(4, 4)) == FlopCount(16, 0, 0)

  def g(x):
    # The scan's stacked outputs (a matmul per step) are dropped; only the carry is used.
    return lax.scan(lambda c, _: (c + 1.0, c @ c), x, None, length=5)[0]

  assert count_flops(g, _spec(4, 4)) == FlopCount(5 * 16, 0, 0)


def test_unknown_primitive_counts_per_element_and_recurses_into_jaxprs():
  prim = Primitive("dca_test_unknown")
  prim.def_abstract_eval(lambda x, **params: jax.core.ShapedArray(x.shape, x.dtype))
  inner = jax.make_jaxpr(lambda a: a @ a)(_spec(4, 4))
  assert count_flops(lambda x: prim.bind(x), _spec(3, 5)) == FlopCount(15, 0, 0)
  assert count_flops(lambda x: prim.bind(x, body=inner), _spec(4, 4)) == FlopCount(128, 128, 0)


def test_known_name_with_unexpected_params_falls_back_instead_of_crashing():
  impostor = Primitive("scan")  # As if a jax version renamed its params.
  impostor.def_abstract_eval(lambda x: jax.core.ShapedArray(x.shape, x.dtype))
  assert count_flops(lambda x: impostor.bind(x), _spec(2, 3)) == FlopCount(6, 0, 0)


# Agreement with XLA on loop-free functions.
#
# What XLA's CPU cost analysis reports, and how it differs from this counter:
# * matmuls and elementwise arithmetic: identical (2MNK; 1 per element; x**3 = 2 multiplies);
# * transcendentals: XLA reports them apart and leaves them out of 'flops', we include them;
# * reductions: XLA counts n - 1 combines per output, we count n (1 per input element);
# * `SAME` convolutions: XLA skips taps in the padding, we count them all.


def _mlp(x, w1, b1, w2):
  return jnp.tanh(x @ w1 + b1) @ w2


def _batched_relu(a, b):
  return jnp.maximum(jnp.einsum("bij,bjk->bik", a, b), 0.0) * 2.0 - a[:, :, :1] ** 3


def _attention(q, k, v):
  s = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, axis=-1), v)


def _num_reduce_outputs(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  names = ("reduce_sum", "reduce_max")
  return sum(e.outvars[0].aval.size for e in jaxpr.eqns if e.primitive.name in names)


# Exact where XLA keeps the jaxpr's arithmetic; for attention XLA's fusion recomputes the
# 1/sqrt(d) scale in two fusions, turns the softmax divide into reciprocal + multiply and folds
# away `max(-inf, m)`, so the counts differ by a few percent.
@pytest.mark.parametrize("fn, shapes, rtol", [
    (lambda x, w: x @ w, [(16, 32), (32, 24)], 0.0),
    (_mlp, [(8, 32), (32, 64), (64,), (64, 16)], 0.0),
    (_batched_relu, [(3, 8, 16), (3, 16, 12)], 0.0),
    (_attention, [(2, 16, 8), (2, 16, 8), (2, 16, 8)], 0.03),
])
def test_agrees_with_xla_on_loop_free_functions(fn, shapes, rtol):
  args = [_spec(*s) for s in shapes]
  ours, xla = count_flops(fn, *args), _xla_cost(fn, *args)
  assert ours.transcendentals == xla["transcendentals"]
  # Undo the two documented conventions: transcendentals inside flops, n (not n - 1) combines.
  comparable = ours.flops - ours.transcendentals - _num_reduce_outputs(fn, *args)
  assert abs(comparable - xla["flops"]) <= rtol * xla["flops"]
  assert ours.matmul_flops > 0.8 * xla["flops"]  # Matmul-bound, so the matmul part is checked.


# Loops.


def test_scan_counts_body_times_length():
  b, d, length = 4, 8, 11

  def f(x, w):
    return lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=length)[0]

  body = FlopCount(2 * b * d * d + b * d, 2 * b * d * d, b * d)
  assert count_flops(f, _spec(b, d), _spec(d, d)) == body * length


def test_scan_over_xs_with_outputs():
  def f(w, xs):
    def step(c, x):
      h = c + x @ w
      return h, jnp.sum(h)
    return lax.scan(step, jnp.zeros((3,)), xs)

  t = 9
  body = 2 * 3 * 5 + 3 + 3  # matvec, add, reduce_sum
  assert count_flops(f, _spec(5, 3), _spec(t, 5)).flops == t * body


def test_nested_scans_multiply():
  b, d, outer, inner = 2, 4, 3, 5

  def f(x, w):
    def outer_step(c, _):
      c = lax.scan(lambda h, _: (h @ w, None), c, None, length=inner)[0]
      return c * 2.0, None
    return lax.scan(outer_step, x, None, length=outer)[0]

  got = count_flops(f, _spec(b, d), _spec(d, d))
  assert got.matmul_flops == outer * inner * 2 * b * d * d
  assert got.flops == outer * (inner * 2 * b * d * d + b * d)


def test_xla_counts_a_scan_body_once_which_is_why_this_exists():
  b, d, length = 8, 32, 16

  def f(x, w):
    return lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=length)[0]

  x, w = _spec(b, d), _spec(d, d)
  ours, xla = count_flops(f, x, w), _xla_cost(f, x, w)
  body_matmul = 2 * b * d * d
  assert ours.matmul_flops == length * body_matmul
  assert xla["flops"] < 1.5 * body_matmul  # One body (plus the loop counter).
  assert xla["transcendentals"] == b * d
  assert ours.flops > 0.9 * length * xla["flops"]


def test_fori_loop_with_static_bounds():
  def f(x):
    return lax.fori_loop(2, 9, lambda i, c: c * 1.5 + 1.0, x)

  # Python-int bounds lower to a scan; its int32 counter costs 1 add per step.
  assert count_flops(f, _spec(4, 5)).flops == 7 * (2 * 20 + 1)


def test_while_with_literal_bounds_is_counted():
  def f(x):
    return lax.fori_loop(jnp.int32(1), jnp.int32(5), lambda i, c: c * 1.5, x)  # A `while`.

  assert "while" in str(jax.make_jaxpr(f)(_spec(3)))
  # 4 trips of (mul + counter add), 5 evaluations of `i < upper`.
  assert count_flops(f, _spec(3)).flops == 4 * (3 + 1) + 5

  def g(x):
    return lax.while_loop(lambda c: c[0] < 6, lambda c: (c[0] + 1, c[1] - 1.0), (0, x))[1]

  assert count_flops(g, _spec(2)).flops == 6 * (2 + 1) + 7


def test_while_with_dynamic_trip_count_raises():
  def f(x, n):
    return lax.fori_loop(0, n, lambda i, c: c * 1.5, x)

  with pytest.raises(ValueError, match="while_loop"):
    count_flops(f, _spec(3), jax.ShapeDtypeStruct((), jnp.int32))

  def g(x):
    return lax.while_loop(lambda c: jnp.sum(c) < 10.0, lambda c: c * 2.0, x)

  with pytest.raises(ValueError, match="trip count"):
    count_flops(g, _spec(3))


# Control flow, calls, transformations.


def test_cond_counts_the_dearest_branch():
  heavy = lambda x: jnp.tanh(x @ x)
  light = lambda x: x + 1.0
  x, p = _spec(6, 6), jax.ShapeDtypeStruct((), jnp.bool_)
  expected = count_flops(heavy, x)
  assert count_flops(lambda p, x: lax.cond(p, heavy, light, x), p, x) == expected
  assert count_flops(lambda p, x: lax.cond(p, light, heavy, x), p, x) == expected


def test_jit_remat_and_custom_derivatives_are_counted_through():
  @jax.custom_vjp
  def g(x):
    return jnp.sin(x)

  g.defvjp(lambda x: (jnp.sin(x), x), lambda x, ct: (ct * jnp.cos(x),))

  def f(x):
    y = jax.jit(lambda a: a @ a)(x)  # jit: 2 * 4**3
    y = jax.checkpoint(jnp.tanh)(y)  # remat2: 16
    return jax.nn.relu(g(y))  # custom_vjp_call (16) then custom_jvp_call (16)

  assert count_flops(f, _spec(4, 4)) == FlopCount(128 + 48, 128, 32)


def _two_layer_loss(w1, w2, x):
  return jnp.sum((jnp.tanh(x @ w1) @ w2) ** 2)


def test_grad_is_counted_and_matmuls_are_exact():
  bsz, din, hid, dout = 8, 16, 32, 4
  args = (_spec(din, hid), _spec(hid, dout), _spec(bsz, din))
  fwd = count_flops(_two_layer_loss, *args)
  grad = count_flops(jax.grad(_two_layer_loss, argnums=(0, 1)), *args)
  assert grad.flops > 2 * fwd.flops
  # Forward x@w1, h@w2; backward dW2, dH, dW1 (no dX: x is not differentiated).
  assert fwd.matmul_flops == 2 * bsz * din * hid + 2 * bsz * hid * dout
  assert grad.matmul_flops == 2 * (2 * bsz * din * hid) + 3 * (2 * bsz * hid * dout)


def test_vjp_wrapped_function_is_counted_without_its_dead_primal():
  def pullback(w1, w2, x, ct):
    _, vjp = jax.vjp(lambda a, b: jnp.tanh(x @ a) @ b, w1, w2)
    return vjp(ct)

  got = count_flops(pullback, _spec(16, 32), _spec(32, 4), _spec(8, 16), _spec(8, 4))
  # x@a (tanh' needs it), dB, dH, dA. The primal h@b is discarded, so it is dead code.
  assert got.matmul_flops == 2 * (2 * 8 * 16 * 32) + 2 * (2 * 8 * 32 * 4)


def test_kwargs_are_static_options():
  def f(x, *, power):
    return x ** power

  assert count_flops(f, _spec(10), power=4).flops == 2 * 10


# The use this counter exists for: asserting complexity in T.


def _linear_attention(q, k, v):
  def step(s, qkv):
    qt, kt, vt = qkv
    s = s + jnp.outer(kt, vt)
    return s, qt @ s

  return lax.scan(step, jnp.zeros((q.shape[1], v.shape[1])), (q, k, v))[1]


def _quadratic_attention(q, k, v):
  mask = jnp.tril(jnp.ones((q.shape[0], k.shape[0]), bool))
  return jnp.where(mask, q @ k.T, 0.0) @ v


@pytest.mark.parametrize("form, lo, hi", [(_linear_attention, 1.9, 2.2),
                                          (_quadratic_attention, 3.6, 4.4)])
def test_complexity_in_sequence_length(form, lo, hi):
  def flops(t):
    return count_flops(form, _spec(t, 8), _spec(t, 8), _spec(t, 8)).flops

  for t in (64, 128, 256):
    assert lo <= flops(2 * t) / flops(t) <= hi


def test_blocked_softmax_is_counted_block_by_block_and_the_counted_trace_computes_the_same():
  """The blocked softmax's loops have data-dependent trip counts (key blocks above the diagonal
  are skipped); while counting it unrolls them, so its FLOPs come out exactly (n (n + 1) / 2
  block pairs of QK^T and PV forward, five matmuls per pair backward) and the unrolled trace
  evaluates to the same outputs and gradients as the loop form, even after an eager call has
  cached the loop form's compiled program."""
  from dca_jax.ops.blocked_softmax import blocked_causal_attention
  b, t, h, k_dim, v_dim, block = 2, 150, 3, 8, 5, 64
  q, k = (jax.random.normal(jax.random.key(i), (b, t, h, k_dim)) for i in range(2))
  v = jax.random.normal(jax.random.key(2), (b, t, h, v_dim))
  f = lambda q, k, v: blocked_causal_attention(q, k, v, scale=k_dim ** -0.5, block=block)
  g = jax.grad(lambda q, k, v: (f(q, k, v) ** 2).sum(), argnums=(0, 1, 2))
  expected_out, expected_grads = f(q, k, v), g(q, k, v)
  pairs = 3 * 4 // 2                                             # 3 blocks of 64 cover 150
  per_pair = 2 * b * h * block * block
  assert flops.count_flops(f, q, k, v).matmul_flops == pairs * per_pair * (k_dim + v_dim)
  assert flops.count_flops(g, q, k, v).matmul_flops == pairs * per_pair * (
      (k_dim + v_dim) + (3 * k_dim + 2 * v_dim))
  for fn, expected in ((f, [expected_out]), (g, expected_grads)):
    with flops._counting_mode():
      closed = jax.make_jaxpr(fn)(q, k, v)
    got = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, q, k, v)
    for a, e in zip(got, expected):
      np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
  assert not flops.counting()
