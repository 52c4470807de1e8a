"""Tests for `dca_jax.attention_compress`: DCA over a whole sequence (`dca_jax/ops/dca.py`).

The heart is equivalence against the float64 NumPy oracle `oracles.dca`, written from the
equations (window softmax over (t-W, t] + decayed memory of every older token of the same
document, one normaliser, rotary at absolute positions), for every engine form; then chained
calls against one call, resets against separate documents, gradients against the dense float64
JAX version of the oracle, dtypes, large inputs and argument checks. Decoding step by step is in
test_memory_state_update.py.

Compilation dominates the run time on CPU, so the tests share a few shapes (B = 2, T = 13,
W = 4 above all, see `oracles`) and jitted entry points, and each distinct shape is compiled once.
"""

from __future__ import annotations

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from dca_jax import (DCAParams, DCAWeights, apply_rotary, attention_compress,
                     compute_weights, init_state)
from oracles import (BATCH, D_MODEL, F32_TOL, HEAD_DIM, HEADS, NUM_FEATURES, ORACLE_TOL, ROTARY,
                     TIME, VALUE_DIM, VARIANTS, WINDOW, assert_states_close, fast_jit, jit_compress,
                     jit_step, jit_weights, random_params, random_reset, random_weights, random_x,
                     slice_time, step_weights, weights_and_state)

# Every engine form, the chunked one with a chunk size that rarely divides T. The planner's choice
# ("auto") is what a default call runs once T > W; the random-shape test adds "auto" and chunk
# sizes 1, 8 and 16, and the gradient test "auto" under differentiation.
MODES = (("recurrent", None), ("associative", None), ("quadratic", None), ("chunked", 3))


# ---------------------------------------------------------------------------------------------
# Values against the oracle.

# (batch, T, W, reset, rotary_base): T = 1, below, equal to and above W, prime T, W = 1.
CASES = (
    (2, 1, 4, False, ROTARY),
    (2, 3, 4, True, None),
    (2, 4, 4, False, ROTARY),
    (2, 13, 4, True, ROTARY),
    (2, 7, 1, True, None),
    (2, 23, 5, False, None),
)


@fast_jit(static_argnames=("window", "rotary_base"))
def _every_mode(weights, reset, window, rotary_base):
  """Every engine form (on the engine path, forced by return_state even when T <= W) and the
  default call (the softmax shortcut when T <= W, "auto" otherwise), in one compilation."""
  outs = [attention_compress(weights, window=window, reset=reset, mode=mode, chunk_size=chunk,
                             rotary_base=rotary_base, return_state=True)[0]
          for mode, chunk in MODES]
  outs.append(attention_compress(weights, window=window, reset=reset, rotary_base=rotary_base))
  return outs


def every_mode(weights, reset, window, rotary_base):
  return zip(MODES + (("default/auto", None),), _every_mode(weights, reset, window, rotary_base))


@pytest.mark.parametrize("batch,time,window,with_reset,rotary_base", CASES)
def test_matches_oracle_every_mode(batch, time, window, with_reset, rotary_base):
  weights = random_weights(time * 7 + window, batch, time, window)
  reset = random_reset(time, batch, time, prob=0.3) if with_reset else None
  expected = oracles.dca(weights, window, reset, rotary_base)
  for (mode, chunk), got in every_mode(weights, reset, window, rotary_base):
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, **ORACLE_TOL,
                               err_msg=f"mode={mode}, chunk_size={chunk}")


@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(window=st.integers(1, 9), extra=st.integers(1, 20),
                  mode=st.sampled_from((("auto", None), ("chunked", 1), ("chunked", 8),
                                        ("chunked", 16)) + MODES),
                  reset_prob=st.sampled_from([0.2, 0.0]),
                  rotary_base=st.sampled_from([ROTARY, None, 100.0]))
def test_matches_oracle_random_shapes(window, extra, mode, reset_prob, rotary_base):
  time = window + extra         # T > W: the shorter cases are all in CASES
  weights = random_weights(time + 31 * window, BATCH, time, window)
  reset = random_reset(window, BATCH, time, reset_prob) if reset_prob else None
  got = jit_compress(weights, window=window, reset=reset, mode=mode[0], chunk_size=mode[1],
                  rotary_base=rotary_base)
  np.testing.assert_allclose(np.asarray(got), oracles.dca(weights, window, reset, rotary_base),
                             **ORACLE_TOL, err_msg=f"T={time}, W={window}, mode={mode}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch,time,window,with_reset,rotary_base",
                         [(2, 3, 4, True, None), (2, 13, 4, True, ROTARY), (2, 23, 5, False, None)])
def test_variants_match_oracle_every_mode(variant, batch, time, window, with_reset, rotary_base):
  """Gated combination and per-channel decay, in every engine form, against the float64 oracle."""
  weights = random_weights(time * 7 + window, batch, time, window, **variant)
  reset = random_reset(time, batch, time, prob=0.3) if with_reset else None
  expected = oracles.dca(weights, window, reset, rotary_base)
  for (mode, chunk), got in every_mode(weights, reset, window, rotary_base):
    np.testing.assert_allclose(np.asarray(got), expected, **ORACLE_TOL,
                               err_msg=f"{variant}, mode={mode}, chunk_size={chunk}")


def test_gate_and_channel_decay_matter():
  """The variant parameters change the output once tokens are in memory (the tests have teeth)."""
  x = random_x(5, (BATCH, TIME, D_MODEL))
  for variant, field in ((dict(combine="gated"), "gate_bias"), (dict(decay="channel"), "decay_up")):
    params = random_params(4, **variant)
    base = np.asarray(jit_compress(jit_weights(params, x), window=WINDOW))
    other = params._replace(**{field: 2.0 * getattr(params, field) + 0.5})
    changed = np.asarray(jit_compress(jit_weights(other, x), window=WINDOW))
    assert np.abs(changed[:, WINDOW + 1:] - base[:, WINDOW + 1:]).max() > 1e-4, variant


def test_memory_matters():
  """Beyond the window the output is not window softmax: the oracle comparisons have teeth."""
  weights = random_weights(3)
  dca = np.asarray(jit_compress(weights, window=WINDOW))
  window_only = oracles.dca(weights, WINDOW, memory=False)
  np.testing.assert_allclose(dca, oracles.dca(weights, WINDOW), **ORACLE_TOL)
  np.testing.assert_allclose(dca[:, :WINDOW], window_only[:, :WINDOW], **ORACLE_TOL)
  assert np.abs(dca[:, WINDOW:] - window_only[:, WINDOW:]).max() > 1e-2


def test_data_dependent_decay_matters():
  """Changing only the decay weights changes the output once tokens are in memory."""
  params = random_params(4)
  x = random_x(5, (BATCH, TIME, D_MODEL))
  base = np.asarray(jit_compress(jit_weights(params, x), window=WINDOW))
  other = params._replace(decay=-params.decay)
  changed = np.asarray(jit_compress(jit_weights(other, x), window=WINDOW))
  np.testing.assert_allclose(changed[:, :WINDOW + 1], base[:, :WINDOW + 1], **F32_TOL)
  assert np.abs(changed[:, WINDOW + 1:] - base[:, WINDOW + 1:]).max() > 1e-4


def test_initial_memory_matches_oracle():
  """A state with an empty window but a nonzero memory: the memory decays and competes."""
  weights = random_weights(6)
  reset = jnp.zeros((BATCH, TIME), bool).at[1, 6].set(True)   # row 1 drops M_0 at t = 6
  old = random_weights(7)
  v1 = jnp.concatenate([old.v, jnp.ones(old.v.shape[:-1] + (1,))], -1)
  memory0 = jnp.einsum("bjhf,bjhv->bhfv", old.k_features, v1)
  state = init_state(BATCH, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, WINDOW)
  state = state._replace(memory=memory0)
  expected = oracles.dca(weights, WINDOW, reset, ROTARY, memory0)

  @fast_jit
  def two_modes(weights, reset, state):
    return [attention_compress(weights, window=WINDOW, reset=reset, state=state, mode=mode,
                               chunk_size=chunk)
            for mode, chunk in (("chunked", 4), ("recurrent", None))]

  for got in two_modes(weights, reset, state):
    np.testing.assert_allclose(np.asarray(got), expected, **ORACLE_TOL)


@pytest.mark.parametrize("time,rotary_base", [(3, None), (4, ROTARY)])
def test_short_sequence_is_causal_softmax(time, rotary_base):
  """T <= W: DCA is causal softmax attention with rotary at absolute positions."""
  weights = random_weights(time * 7 + WINDOW, BATCH, time, WINDOW)   # as in CASES: same compile
  q, k = weights.q, weights.k
  if rotary_base is not None:
    q = apply_rotary(q, jnp.arange(time), base=rotary_base)
    k = apply_rotary(k, jnp.arange(time), base=rotary_base)
  # dot_product_attention needs K = V: pad the values' head dim onto K with zeros and cut back.
  v = jnp.pad(weights.v, ((0, 0), (0, 0), (0, 0), (0, HEAD_DIM - VALUE_DIM)))
  expected = jax.jit(jax.nn.dot_product_attention, static_argnames="is_causal")(
      q, k, v, is_causal=True)[..., :VALUE_DIM]
  # No reset: the case without reset is called with None, the other with an all-false mask.
  reset = None if rotary_base is not None else jnp.zeros((BATCH, time), bool)
  for (mode, chunk), got in every_mode(weights, reset, WINDOW, rotary_base):
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6,
                                custom_message=f"mode={mode}, chunk_size={chunk}")


# ---------------------------------------------------------------------------------------------
# Chained calls.


# T1 below, equal to and above W = 4 (T - T1 = 3 below W), each across a reset at the split.
@pytest.mark.parametrize("split,mode,chunk", [(1, "chunked", 4), (4, "recurrent", None),
                                              (11, "chunked", 4)])
def test_chained_calls_equal_one_call(split, mode, chunk):
  time = 14
  weights = random_weights(12, BATCH, time, WINDOW)
  # Row 0 starts a document exactly at the split, row 1 just after it and again later.
  reset = np.zeros((BATCH, time), bool)
  reset[0, split] = True
  reset[1, [split + 1, 12]] = True
  reset = jnp.asarray(reset)
  kwargs = dict(window=WINDOW, mode=mode, chunk_size=chunk, return_state=True)
  full, full_state = jit_compress(weights, reset=reset, **kwargs)
  first, state = jit_compress(slice_time(weights, 0, split), reset=reset[:, :split], **kwargs)
  second, state = jit_compress(slice_time(weights, split, time), reset=reset[:, split:], state=state,
                            **kwargs)
  chex.assert_trees_all_close(jnp.concatenate([first, second], 1), full, **F32_TOL)
  assert_states_close(state, full_state, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(full), oracles.dca(weights, WINDOW, reset), **ORACLE_TOL)


@pytest.mark.parametrize("time,window,with_reset,rotary_base",
                         [(3, 4, True, ROTARY), (29, 8, False, ROTARY), (17, 1, True, None)])
def test_no_state_equals_the_empty_state(time, window, with_reset, rotary_base):
  """Without a state the window runs over the new tokens alone and the memory reads them
  shifted by W (`dca._fresh_compress`); with an explicit empty state, over the state's W empty
  slots and the tokens after them. Outputs, returned states and gradients agree."""
  weights = random_weights(time + 31 * window, BATCH, time, window)
  reset = random_reset(time + 5, BATCH, time, prob=0.3) if with_reset else None
  empty = init_state(BATCH, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, window)

  @fast_jit
  def both(weights):
    return [attention_compress(weights, window=window, reset=reset, state=state,
                               rotary_base=rotary_base, return_state=True)
            for state in (None, empty)]

  (fresh, fresh_state), (held, held_state) = both(weights)
  chex.assert_trees_all_close(fresh, held, **F32_TOL)
  assert_states_close(fresh_state, held_state, rtol=1e-5, atol=1e-5)

  @fast_jit
  def grads(weights):
    probe = random_x(99, held.shape)
    return [jax.grad(lambda w, s=s: jnp.sum(probe * attention_compress(
        w, window=window, reset=reset, state=s, rotary_base=rotary_base)))(weights)
            for s in (None, empty)]

  fresh_grad, held_grad = grads(weights)
  chex.assert_trees_all_close(fresh_grad, held_grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Resets.


def test_reset_equals_separate_documents():
  weights = random_weights(13)
  starts = [0, 3, 4]             # documents of 3, 1 and 9 tokens (the last one past the window)
  reset = jnp.zeros((BATCH, TIME), bool).at[:, jnp.array(starts[1:])].set(True)
  packed = jit_compress(weights, window=WINDOW, reset=reset)
  for start, stop in zip(starts, starts[1:] + [TIME]):
    alone = jit_compress(slice_time(weights, start, stop), window=WINDOW)
    chex.assert_trees_all_close(packed[:, start:stop], alone, **F32_TOL)


def test_reset_at_first_token_drops_carried_state():
  weights = random_weights(14)
  _, state = jit_compress(slice_time(weights, 0, 4), window=WINDOW, return_state=True)
  reset = jnp.zeros((BATCH, 9), bool).at[:, 0].set(True)
  carried = jit_compress(slice_time(weights, 4, TIME), window=WINDOW, reset=reset, state=state)
  fresh = jit_compress(slice_time(weights, 4, TIME), window=WINDOW)
  chex.assert_trees_all_close(carried, fresh, **F32_TOL)


# ---------------------------------------------------------------------------------------------
# Gradients.


def _loss(params, x, cotangent, reset, window, mode, chunk, rotary_base=ROTARY):
  o = attention_compress(compute_weights(params, x), window=window, reset=reset, mode=mode,
                         chunk_size=chunk, rotary_base=rotary_base)
  return jnp.sum(o * cotangent)


@fast_jit(static_argnames="window")
def _grads_three_modes(params, x, cotangent, reset, window):
  return {mode: jax.grad(_loss)(params, x, cotangent, reset, window, mode, chunk)
          for mode, chunk in (("chunked", 4), ("recurrent", None), ("auto", None))}


GRAD_SHAPE = (BATCH, 11, 3)   # batch, T, W


@pytest.mark.parametrize("variant", ({},) + VARIANTS)
def test_gradients_match_float64_reference(variant):
  batch, time, window = GRAD_SHAPE
  params = random_params(15, window=window, **variant)
  x = random_x(16, (batch, time, D_MODEL))
  cotangent = random_x(17, (batch, time, HEADS, VALUE_DIM))
  reset = jnp.zeros((batch, time), bool).at[1, 7].set(True)
  grads = _grads_three_modes(params, x, cotangent, reset, window)

  with jax.enable_x64(True):
    @fast_jit
    def reference(params, x, cotangent):
      weights = compute_weights(params, x)
      o, vjp = jax.vjp(lambda p: oracles.dca_dense(compute_weights(p, x), window, reset), params)
      return weights, o, vjp(cotangent)[0]
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)
    weights64, o64, ref = reference(to64(params), to64(x), to64(cotangent))
    weights64, o64 = jax.tree.map(np.asarray, weights64), np.asarray(o64)
    ref = jax.tree.map(lambda a: np.asarray(a, np.float64), ref)

  # The two oracles are independent codings of the equations: they agree in float64.
  np.testing.assert_allclose(o64, oracles.dca(weights64, window, reset), rtol=1e-10, atol=1e-10)
  for mode, grad in grads.items():
    for name, got, want in zip(DCAParams._fields, grad, ref):
      if want is None:
        assert got is None and getattr(params, name) is None, name
        continue
      assert np.all(np.isfinite(got)), (mode, name)
      scale = np.abs(want).max()
      assert scale > 0, name                      # every parameter matters, decay included
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * scale,
                                 err_msg=f"mode={mode}, param={name}")


# ---------------------------------------------------------------------------------------------
# Dtypes and large inputs.


def test_bfloat16_weights_match_float32():
  """bf16 weights: same f32 internals on the rounded inputs, so only the output rounding differs."""
  weights = random_weights(18)
  w16 = DCAWeights(*(x.astype(jnp.bfloat16) for x in weights[:5]), weights.log_decay)
  w32 = DCAWeights(*(x.astype(jnp.float32) for x in w16[:5]), weights.log_decay)
  got = jit_compress(w16, window=WINDOW)
  assert got.dtype == jnp.bfloat16
  expected = jit_compress(w32, window=WINDOW)
  chex.assert_trees_all_close(got.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("time", [3, TIME])   # the softmax shortcut and the engine path
def test_bfloat16_end_to_end(time):
  params = random_params(19)
  x = random_x(20, (BATCH, time, D_MODEL))
  got = jit_compress(jit_weights(params, x.astype(jnp.bfloat16)), window=WINDOW)
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got.astype(jnp.float32))
  assert np.all(np.isfinite(got))
  expected = np.asarray(jit_compress(jit_weights(params, x), window=WINDOW))
  np.testing.assert_allclose(got, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())


def test_large_inputs_are_finite():
  """x * 30: scores in the thousands, Taylor features ~1e4, decays near 0: everything stays finite.

  The key projection is tied to the query's so that s_tt = |q_t|^2 / sqrt(K) >= 0: the true
  normaliser is then >= 1 and representable. (Untied projections, whose window scores can all be
  far below zero, are covered by the tests below.)
  """
  params = random_params(21)
  params = params._replace(key=params.query)
  x = 30.0 * random_x(22, (BATCH, TIME, D_MODEL))
  weights = jit_weights(params, x)
  assert float(jnp.max(jnp.abs(weights.q_features))) > 1e3
  assert float(jnp.min(weights.log_decay)) < -10
  reset = random_reset(2, BATCH, TIME, prob=0.3)
  for (mode, chunk), o in every_mode(weights, reset, WINDOW, ROTARY):
    assert np.all(np.isfinite(np.asarray(o))), (mode, chunk)
  o16 = jit_compress(jit_weights(params, x.astype(jnp.bfloat16)), window=WINDOW)
  assert np.all(np.isfinite(np.asarray(o16.astype(jnp.float32))))
  batch, time, window = GRAD_SHAPE
  params = random_params(24, window)
  params = params._replace(key=params.query)
  x = 30.0 * random_x(23, (batch, time, D_MODEL))
  grads = _grads_three_modes(params, x, jnp.ones((batch, time, HEADS, VALUE_DIM)),
                           jnp.zeros((batch, time), bool), window)
  for mode, grad in grads.items():
    for name, g in zip(DCAParams._fields, grad):
      if g is not None:                   # the options' fields (None by default) have no grad
        assert np.all(np.isfinite(np.asarray(g))), (mode, name)


def test_very_negative_scores_with_empty_memory_are_finite():
  # One token, s_00 = q.k / sqrt(2) = -144 / sqrt(2) ~ -102; the exact answer is o = v = 1.
  q = jnp.array([[[[12.0, 0.0]]]])
  ones = jnp.ones((1, 1, 1, 3))
  w = DCAWeights(q, -q, jnp.ones((1, 1, 1, 2)), ones, ones, jnp.zeros((1, 1, 1)))
  expected = jnp.ones((1, 1, 1, 2))
  chex.assert_trees_all_close(jit_compress(w, window=4), expected)   # the shortcut is fine
  chex.assert_trees_all_close(jit_compress(w, window=4, return_state=True)[0], expected)  # NaN
  state = init_state(1, 1, 2, 2, 3, 4)
  chex.assert_trees_all_close(jit_step(state, step_weights(w, 0))[0], expected[:, 0])      # NaN


# ---------------------------------------------------------------------------------------------
# Arguments and transformations.


def test_attention_compress_rejects_bad_arguments():
  weights, state = weights_and_state()
  for window in (0, -1, 2.0, None):
    with pytest.raises(ValueError, match="window"):
      attention_compress(weights, window=window)
  with pytest.raises(ValueError, match="reset"):
    attention_compress(weights, window=WINDOW, reset=jnp.zeros((BATCH, TIME - 1), bool))
  with pytest.raises(TypeError, match="reset"):
    attention_compress(weights, window=WINDOW, reset=jnp.zeros((BATCH, TIME), jnp.int32))
  with pytest.raises(ValueError, match="mode"):
    attention_compress(weights, window=WINDOW, mode="fast")
  with pytest.raises(ValueError, match="chunk_size"):   # raised after the window is computed:
    jax.eval_shape(lambda w: attention_compress(w, window=WINDOW, mode="chunked", chunk_size=0),
                   weights)                          # trace only
  with pytest.raises(TypeError, match="state"):
    attention_compress(weights, window=WINDOW, state=(state.keys, state.memory))
  with pytest.raises(ValueError, match="window"):
    attention_compress(weights, window=WINDOW + 1, state=state)
  with pytest.raises(TypeError, match="weights.q"):
    attention_compress(weights._replace(q=weights.q.astype(jnp.int32)), window=WINDOW)


def test_attention_compress_checks_chunk_size_on_every_path():
  weights, _ = weights_and_state()
  with pytest.raises(ValueError, match="chunk_size"):
    jax.eval_shape(lambda w: attention_compress(w, window=TIME, chunk_size=0), weights)  # T <= W


def test_vmap_over_batch_equals_batched_call():
  weights = random_weights(25)
  per_row = fast_jit(jax.vmap(lambda w: attention_compress(
      DCAWeights(*(None if x is None else x[None] for x in w)), window=WINDOW)[0]))(weights)
  chex.assert_trees_all_close(per_row, jit_compress(weights, window=WINDOW), **F32_TOL)
