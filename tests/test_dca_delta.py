"""DCA with the delta-rule memory (memory="delta", `dca_jax.ops.dca_delta`): every form against
a float64 oracle written from the equations, exact softmax while T <= W, chained calls and
decoding steps against one call, gradients against a float64 reference, and the layer's
options. Its share of the layer contract (prefill and decode equal the forward, resets, the
cache) runs in test_layers.py as a DCA variant."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracles
from dca_jax import DCADeltaState, DCAParams, attention_compress, compute_weights, init_params
from dca_jax.nn import DCAttention
from oracles import (BATCH, D_MODEL, F32_TOL, HEADS, ORACLE_TOL, ROTARY, WINDOW, fast_jit,
                     jit_compress, jit_step, random_params, random_x, slice_time,
                     step_weights)

DELTA = dict(memory="delta")


@functools.cache
def delta_params():
  """One set of random delta-memory parameters (W = `WINDOW`) for the tests: drawn once."""
  return random_params(34, window=WINDOW, **DELTA)


def delta_weights(seed, time):
  return oracles.jit_weights(delta_params(), random_x(seed, (BATCH, time, D_MODEL)))


def test_short_sequence_is_causal_softmax():
  """T <= W: no token has left the window, the memory adds exactly 0, whether the call takes
  the softmax shortcut or runs the memory (return_state). T = W, the last length where it holds."""
  time = WINDOW
  weights = delta_weights(32, time)
  positions = np.arange(time, dtype=np.float64)
  expected = oracles.window_attention(oracles.rotary(np.asarray(weights.q, np.float64), positions),
                                      oracles.rotary(np.asarray(weights.k, np.float64), positions),
                                      weights.v, time)
  shortcut = jit_compress(weights, window=WINDOW)
  with_memory, state = jit_compress(weights, window=WINDOW, return_state=True)
  np.testing.assert_allclose(np.asarray(shortcut), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(with_memory), expected, rtol=1e-5, atol=1e-6)
  assert isinstance(state, DCADeltaState) and not np.asarray(state.memory).any()


@pytest.mark.parametrize("rows", [(0, 2), (0, 1), (1, 2)], ids=["batch2", "row0", "row1"])
def test_prefill_then_steps_equal_one_call(rows):
  """A call over 6 tokens, then steps with resets (a document starts at a step in row 0, at the
  first step in row 1), equal one call; chained layer prefills are in the layer contract. Each
  row alone too: at batch 1 a step reads its buffers before writing (`read_before_write`)."""
  weights = delta_weights(33, 14)
  reset = oracles.document_reset(14, ((0, 9), (0, 6)))
  weights = jax.tree.map(lambda x: x[rows[0]:rows[1]], weights)
  reset = reset[rows[0]:rows[1]]
  full, full_state = jit_compress(weights, window=WINDOW, reset=reset, return_state=True)
  first, state = jit_compress(slice_time(weights, 0, 6), window=WINDOW, reset=reset[:, :6],
                              return_state=True)
  chex.assert_trees_all_close(first, full[:, :6], **F32_TOL)
  steps = []
  for t in range(6, 14):
    o_t, state = jit_step(state, step_weights(weights, t), reset=reset[:, t])
    steps.append(o_t)
  chex.assert_trees_all_close(jnp.stack(steps, 1), full[:, 6:], **F32_TOL)
  oracles.assert_states_close(state, full_state, **F32_TOL)


GRAD_TIME, GRAD_WINDOW = 13, WINDOW


@fast_jit
def _forms(params, x, cotangent, reset):
  """Output and parameter gradient of two forms: chunked (3 chunks of 4 + 1) and recurrent."""
  def run(mode, chunk):
    o, vjp = jax.vjp(lambda p: attention_compress(
        compute_weights(p, x), window=GRAD_WINDOW, reset=reset, mode=mode, chunk_size=chunk,
        rotary_base=ROTARY), params)
    return o, vjp(cotangent)[0]
  return {"chunked": run("chunked", 4), "recurrent": run("recurrent", None)}


def test_forms_match_float64_oracle_in_value_and_gradient():
  """T = 13 (prime, not a multiple of the chunk), W = 4, K = 8 != V = 6; documents of 5 and 8
  tokens in one row (past the window) and of 2, 1 and 10 in the other."""
  params = delta_params()
  x = random_x(35, (BATCH, GRAD_TIME, D_MODEL))
  cotangent = random_x(36, (BATCH, GRAD_TIME, HEADS, oracles.VALUE_DIM))
  reset = oracles.document_reset(GRAD_TIME, ((0, 5), (0, 2, 3)))
  forms = _forms(params, x, cotangent, reset)
  with jax.enable_x64(True):
    @fast_jit
    def reference(params, x, cotangent):
      weights = compute_weights(params, x)
      o, vjp = jax.vjp(lambda p: oracles.dca_delta_dense(compute_weights(p, x), GRAD_WINDOW,
                                                         reset), params)
      return weights, o, vjp(cotangent)[0]
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)
    weights64, o64, ref = reference(to64(params), to64(x), to64(cotangent))
    weights64, o64 = jax.tree.map(np.asarray, weights64), np.asarray(o64)
    ref = jax.tree.map(lambda a: np.asarray(a, np.float64), ref)
  # The two oracles are independent codings of the equations: they agree in float64.
  expected = oracles.dca_delta(weights64, GRAD_WINDOW, reset)
  np.testing.assert_allclose(o64, expected, rtol=1e-10, atol=1e-10)
  # The memory matters: the window alone is something else.
  positions = np.arange(GRAD_TIME, dtype=np.float64)
  window_only = oracles.window_attention(oracles.rotary(weights64.q, positions),
                                         oracles.rotary(weights64.k, positions), weights64.v,
                                         GRAD_WINDOW, reset=reset)
  assert np.abs(window_only - expected).max() > 1e-2
  for mode, (o, grad) in forms.items():
    np.testing.assert_allclose(np.asarray(o), expected, **ORACLE_TOL, err_msg=mode)
    for name, got, want in zip(DCAParams._fields, grad, ref):
      if want is None:
        assert got is None and getattr(params, name) is None, name
        continue
      assert np.all(np.isfinite(got)), (mode, name)
      scale = np.abs(want).max()
      assert scale > 0, name                      # every parameter matters, beta included
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4 * scale,
                                 err_msg=f"mode={mode}, param={name}")


def test_parameters_and_initial_gate():
  params, additive = fast_jit(lambda key: (init_params(key, 32, 4, window=8, **DELTA),
                                           init_params(key, 32, 4, window=8)))(jax.random.key(0))
  assert params.feature is None and params.decay_up is None
  assert params.beta.shape == params.gate.shape == (32, 4)
  np.testing.assert_array_equal(params.gate_bias, -2.0)
  # The additive memory's parameters are drawn as before the delta memory existed.
  for name in ("query", "key", "value", "decay", "decay_bias"):
    np.testing.assert_array_equal(getattr(params, name), getattr(additive, name))
  layer = nnx.eval_shape(lambda: DCAttention(32, 4, window=8, rngs=nnx.Rngs(0), **DELTA))
  names = sorted(jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(nnx.state(layer, nnx.Param)))
  assert len(names) == 10, names      # q, k, v, decay, decay_bias, gate, gate_bias, beta, out, conv


@pytest.mark.parametrize("options,match", [
    (dict(memory="sum"), r"memory must be one of 'additive', 'delta', got 'sum'"),
    (dict(memory="delta", combine="gated"), r"combine='unified' .* got combine='gated'"),
    (dict(memory="delta", decay="channel"), r"decay='head', got .*decay='channel'"),
])
def test_bad_options_name_the_argument(options, match):
  with pytest.raises(ValueError, match=match):
    DCAttention(32, 4, window=8, rngs=nnx.Rngs(0), **options)


def test_caches_of_the_other_memory_are_refused():
  delta, additive = (nnx.eval_shape(lambda o=o: DCAttention(32, 4, window=8, feature_dim=4,
                                                             short_conv=0, rngs=nnx.Rngs(0), **o))
                     for o in (DELTA, {}))
  x_t = np.ones((2, 32), np.float32)
  with pytest.raises(TypeError, match="DCADeltaState"):
    delta.decode_step(x_t, additive.init_cache(2, 8))
  with pytest.raises(TypeError, match="DCAState"):
    additive.decode_step(x_t, delta.init_cache(2, 8))
