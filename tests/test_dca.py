"""Tests for Dynamic Compression Attention: `dca_jax.ops.dca` and the `DCAttention` layer.

The heart is equivalence against a float64 NumPy oracle written here straight from the equations
of `dca_jax/ops/dca.py` (window softmax over (t-W, t] + decayed memory of every older token of the
same document, one normaliser, rotary at absolute positions), for every engine form, and between
the library's own paths: whole sequence vs chained calls vs token-by-token decoding, with and
without document resets. Gradients are checked against a dense float64 JAX version of the oracle.

Compilation dominates the run time on CPU, so the tests share a few shapes (B = 2, T = 13,
W = 4 above all) and jitted entry points, and each distinct shape is compiled once.
"""

from __future__ import annotations

import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dca_jax import (DCAParams, DCAState, DCAWeights, Mode, PlanKind, adaptive_scale, apply_rotary,
                     attention_compress, causal_short_conv, compute_weights, half_life_bias,
                     init_params, init_state, memory_state_update, plan_engine)
from dca_jax.nn import DCAttention

D_MODEL, HEADS, HEAD_DIM, VALUE_DIM, FEAT = 16, 2, 8, 6, 4   # K != V on purpose
NUM_FEATURES = 1 + FEAT + FEAT * (FEAT + 1) // 2             # Taylor: F = 15
BATCH, TIME, WINDOW = 2, 13, 4                               # the shared shape: T prime, T > W
F32_TOL = dict(rtol=1e-5, atol=1e-5)
ORACLE_TOL = dict(rtol=2e-5, atol=2e-5)
ROTARY = 10000.0

# Every engine form, the chunked one with a chunk size that rarely divides T. The planner's choice
# ("auto") is what a default call runs once T > W; the random-shape test adds "auto" and chunk
# sizes 1, 8 and 16, and the gradient test "auto" under differentiation.
MODES = (("recurrent", None), ("associative", None), ("quadratic", None), ("chunked", 3))


# ---------------------------------------------------------------------------------------------
# Inputs.

_weights = jax.jit(compute_weights)
_compress = jax.jit(attention_compress,
                    static_argnames=("window", "mode", "chunk_size", "rotary_base", "return_state"))
_step = jax.jit(memory_state_update, static_argnames=("rotary_base",))


# The variants of the mechanism (`combine`, `decay` of `init_params`) the tests run besides the
# default (unified combination, one rate per head).
VARIANTS = (dict(combine="gated"), dict(decay="channel"), dict(combine="gated", decay="channel"))


def random_params(seed, window=WINDOW, **variant):
  """`init_params` with random (nonzero) decay and gate weights, so rates and gates depend on x."""
  key, decay_key, up_key, gate_key = jax.random.split(jax.random.key(seed), 4)
  params = init_params(key, D_MODEL, HEADS, window=window, head_dim=HEAD_DIM, value_dim=VALUE_DIM,
                       feature_dim=FEAT, **variant)
  changes = {}
  if params.decay_up is None:
    changes["decay"] = 0.5 / math.sqrt(D_MODEL) * jax.random.normal(decay_key, (D_MODEL, HEADS))
  else:
    changes["decay_up"] = 0.3 * jax.random.normal(up_key, params.decay_up.shape)
  if params.gate is not None:
    changes["gate"] = jax.random.normal(gate_key, params.gate.shape) / math.sqrt(D_MODEL)
    changes["gate_bias"] = jnp.linspace(-1.0, 1.0, HEADS)
  return params._replace(**changes)


def random_x(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def random_reset(seed, batch, time, prob=0.2):
  return jnp.asarray(np.random.default_rng(seed).random((batch, time)) < prob)


def random_weights(seed, batch=BATCH, time=TIME, window=WINDOW, **variant):
  return _weights(random_params(seed, window, **variant),
                  random_x(seed + 1000, (batch, time, D_MODEL)))


def slice_time(weights, start, stop):
  return DCAWeights(*(None if x is None else x[:, start:stop] for x in weights))


def step_weights(weights, t):
  return DCAWeights(*(None if x is None else x[:, t] for x in weights))


def assert_states_close(got, expected, **tol):
  if hasattr(got, "inputs"):           # a DCAConvCache: the inputs kept for the convolution too
    chex.assert_trees_all_close(got.inputs, expected.inputs, **tol, custom_message="inputs")
    got, expected = got.state, expected.state
  for name in ("keys", "values", "key_features", "memory"):
    chex.assert_trees_all_close(getattr(got, name), getattr(expected, name), **tol,
                                custom_message=f"state.{name}")
  np.testing.assert_array_equal(np.asarray(got.doc), np.asarray(expected.doc), err_msg="state.doc")


# ---------------------------------------------------------------------------------------------
# Oracles.


def rotary(xp, x, positions, base):
  """Half-split rotary embedding at absolute positions, in whatever precision x has (np or jnp)."""
  key_dim = x.shape[-1]
  half = key_dim // 2
  freqs = base ** (-np.arange(0, key_dim, 2, dtype=np.float64) / key_dim)
  angles = xp.asarray(positions)[:, None, None] * xp.asarray(freqs, x.dtype)   # [T, 1, K/2]
  cos, sin = xp.cos(angles), xp.sin(angles)
  x1, x2 = x[..., :half], x[..., half:]
  return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def dca_oracle(weights, window, reset=None, rotary_base=ROTARY, memory0=None, memory=True):
  """DCA by its definition, one token at a time, in float64.

  For token t of document doc(t): window keys j in (t-W, t] with doc(j) = doc(t), scores
  s_tj = q_t^R . k_j^R / sqrt(K), m_t = max(0, max_j s_tj); memory
  M_t = sum_{j <= t-W, doc(j) = doc(t)} (prod_{i=j+W+1..t} a_i) phi(k_j) [v_j, 1]^T
        (+ prod_{i<=t} a_i M_0 while t is still in the first document);
  o_t = (sum e^{s-m} v + e^{-m} phi(q_t) M_t[:, :V]) / (sum e^{s-m} + e^{-m} phi(q_t) M_t[:, V]).
  With memory=False, M_t = 0: window softmax alone. Per-channel decay: a_i [H, F] multiplies
  memory row f by its own rate. Gated combination (weights.gate = g): each part normalised on its
  own, o_t = sigmoid(g) window + (1 - sigmoid(g)) phi(q) M[:, :V] / phi(q) M[:, V] (0 if empty).
  """
  q, k, v, qf, kf, log_decay = (np.asarray(x, np.float64) for x in weights[:6])
  gate = None if weights.gate is None else 1.0 / (1.0 + np.exp(-np.asarray(weights.gate, np.float64)))
  per_channel = log_decay.ndim == 4
  batch, time, heads, key_dim = q.shape
  value_dim, feats = v.shape[-1], qf.shape[-1]
  doc = np.zeros((batch, time), int) if reset is None else np.cumsum(np.asarray(reset), axis=1)
  if rotary_base is not None:
    positions = np.arange(time, dtype=np.float64)
    q, k = rotary(np, q, positions, rotary_base), rotary(np, k, positions, rotary_base)
  a = np.exp(log_decay)
  out = np.zeros((batch, time, heads, value_dim))
  for b in range(batch):
    for t in range(time):
      same = doc[b] == doc[b, t]
      win = [j for j in range(max(0, t - window + 1), t + 1) if same[j]]
      old = [j for j in range(0, t - window + 1) if same[j] and memory]
      s = np.einsum("hk,jhk->hj", q[b, t], k[b, win]) / np.sqrt(key_dim)
      m = np.maximum(0.0, s.max(-1))
      p = np.exp(s - m[:, None])
      num, den = np.einsum("hj,jhv->hv", p, v[b, win]), p.sum(-1)
      mem = np.zeros((heads, feats, value_dim + 1))
      for j in old:
        decay = np.prod(a[b, j + window + 1:t + 1], axis=0)                  # [H] or [H, F]
        decay = decay[:, :, None] if per_channel else decay[:, None, None]
        v1 = np.concatenate([v[b, j], np.ones((heads, 1))], axis=-1)
        mem += decay * kf[b, j][:, :, None] * v1[:, None, :]
      if memory0 is not None and doc[b, t] == 0:
        decay0 = np.prod(a[b, :t + 1], axis=0)
        decay0 = decay0[:, :, None] if per_channel else decay0[:, None, None]
        mem += decay0 * np.asarray(memory0[b], np.float64)
      read = np.einsum("hf,hfv->hv", qf[b, t], mem)
      if gate is not None:
        mem_part = np.where(read[:, value_dim:] > 0,
                            read[:, :value_dim] / np.where(read[:, value_dim:] > 0, read[:, value_dim:], 1), 0)
        g = gate[b, t][:, None]
        out[b, t] = g * num / den[:, None] + (1 - g) * mem_part
        continue
      w = np.exp(-m)[:, None]
      out[b, t] = (num + w * read[:, :value_dim]) / (den[:, None] + w * read[:, value_dim:])
  return out


def dca_dense(weights, window, reset=None, rotary_base=ROTARY):
  """The oracle as dense masked T x T JAX (differentiable; float64 under jax.enable_x64)."""
  q, k, v, qf, kf, log_decay = weights[:6]
  dtype = q.dtype
  if log_decay.ndim == 3:
    log_decay = log_decay[..., None]                                              # [B, T, H, 1]
  log_decay = log_decay.astype(dtype)
  batch, time, _, key_dim = q.shape
  doc = jnp.zeros((batch, time), jnp.int32) if reset is None else jnp.cumsum(reset, axis=1)
  if rotary_base is not None:
    positions = jnp.arange(time, dtype=dtype)
    q, k = rotary(jnp, q, positions, rotary_base), rotary(jnp, k, positions, rotary_base)
  t = jnp.arange(time)[:, None]
  j = jnp.arange(time)[None, :]
  same = doc[:, :, None] == doc[:, None, :]                                     # [B, T, T]
  in_window = (same & (j <= t) & (j > t - window))[:, None]                      # [B, 1, T, T]
  in_memory = (same & (j <= t - window))[:, None]
  s = jnp.einsum("bthk,bjhk->bhtj", q, k) / np.sqrt(key_dim)
  s = jnp.where(in_window, s, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.maximum(0.0, s.max(-1)))                       # [B, H, T]
  p = jnp.exp(s - m[..., None])
  # Decay of key j at query t: exp(L_t - L_{j+W}) with L the prefix sum of log decays, per head
  # (last axis 1) or per feature.
  cum = jnp.moveaxis(jnp.cumsum(log_decay, axis=1), 2, 1)                         # [B, H, T, C]
  pad = jnp.zeros(cum.shape[:2] + (min(window, time),) + cum.shape[3:], dtype)
  shifted = jnp.concatenate([cum[:, :, window:], pad], axis=2)[:, :, :time]
  expo = cum[:, :, :, None] - shifted[:, :, None, :]                              # [B, H, T, T, C]
  mask = in_memory[..., None]
  decay = jnp.where(mask, jnp.exp(jnp.where(mask, expo, 0.0)), 0.0)
  kernel = jnp.einsum("bthf,bjhf,bhtjf->bhtj", qf, kf,
                      jnp.broadcast_to(decay, decay.shape[:4] + (qf.shape[-1],)))
  if weights.gate is not None:
    g = jax.nn.sigmoid(jnp.moveaxis(weights.gate.astype(dtype), 2, 1))[..., None]  # [B, H, T, 1]
    window_part = jnp.einsum("bhtj,bjhv->bhtv", p, v) / p.sum(-1)[..., None]
    mem_den = kernel.sum(-1)[..., None]
    has = mem_den > 0
    mem_part = jnp.where(has, jnp.einsum("bhtj,bjhv->bhtv", kernel, v)
                         / jnp.where(has, mem_den, 1.0), 0.0)
    return jnp.moveaxis(g * window_part + (1 - g) * mem_part, 1, 2)
  w = jnp.exp(-m)
  num = jnp.einsum("bhtj,bjhv->bthv", p + w[..., None] * kernel, v)
  den = (p.sum(-1) + w * kernel.sum(-1))
  return num / jnp.moveaxis(den, 1, 2)[..., None]


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


@jax.jit(static_argnames=("window", "rotary_base"))
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
  expected = dca_oracle(weights, window, reset, rotary_base)
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
  got = _compress(weights, window=window, reset=reset, mode=mode[0], chunk_size=mode[1],
                  rotary_base=rotary_base)
  np.testing.assert_allclose(np.asarray(got), dca_oracle(weights, window, reset, rotary_base),
                             **ORACLE_TOL, err_msg=f"T={time}, W={window}, mode={mode}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch,time,window,with_reset,rotary_base",
                         [(2, 3, 4, True, None), (2, 13, 4, True, ROTARY), (2, 23, 5, False, None)])
def test_variants_match_oracle_every_mode(variant, batch, time, window, with_reset, rotary_base):
  """Gated combination and per-channel decay, in every engine form, against the float64 oracle."""
  weights = random_weights(time * 7 + window, batch, time, window, **variant)
  reset = random_reset(time, batch, time, prob=0.3) if with_reset else None
  expected = dca_oracle(weights, window, reset, rotary_base)
  for (mode, chunk), got in every_mode(weights, reset, window, rotary_base):
    np.testing.assert_allclose(np.asarray(got), expected, **ORACLE_TOL,
                               err_msg=f"{variant}, mode={mode}, chunk_size={chunk}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_decode_and_chained_calls_equal_whole_sequence(variant):
  weights = random_weights(21, **variant)
  reset = jnp.zeros((BATCH, TIME), bool).at[0, 6].set(True)
  full, state_full = _compress(weights, window=WINDOW, reset=reset, return_state=True)
  # The whole sequence without reset for the decode comparison (decode steps take no reset).
  plain = _compress(weights, window=WINDOW)
  state = init_state(BATCH, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, WINDOW)
  outs = []
  for t in range(TIME):
    o, state = _step(state, step_weights(weights, t))
    outs.append(o)
  np.testing.assert_allclose(np.asarray(jnp.stack(outs, 1)), np.asarray(plain), **F32_TOL)
  o1, mid = _compress(slice_time(weights, 0, 5), window=WINDOW, return_state=True)
  o2, end = _compress(slice_time(weights, 5, TIME), window=WINDOW, state=mid, return_state=True)
  np.testing.assert_allclose(np.asarray(jnp.concatenate([o1, o2], 1)), np.asarray(plain), **F32_TOL)
  assert_states_close(end, state, **F32_TOL)
  np.testing.assert_allclose(np.asarray(full), dca_oracle(weights, WINDOW, reset), **ORACLE_TOL)


def test_gate_and_channel_decay_matter():
  """The variant parameters change the output once tokens are in memory (the tests have teeth)."""
  x = random_x(5, (BATCH, TIME, D_MODEL))
  for variant, field in ((dict(combine="gated"), "gate_bias"), (dict(decay="channel"), "decay_up")):
    params = random_params(4, **variant)
    base = np.asarray(_compress(_weights(params, x), window=WINDOW))
    other = params._replace(**{field: 2.0 * getattr(params, field) + 0.5})
    changed = np.asarray(_compress(_weights(other, x), window=WINDOW))
    assert np.abs(changed[:, WINDOW + 1:] - base[:, WINDOW + 1:]).max() > 1e-4, variant


def test_memory_matters():
  """Beyond the window the output is not window softmax: the oracle comparisons have teeth."""
  weights = random_weights(3)
  dca = np.asarray(_compress(weights, window=WINDOW))
  window_only = dca_oracle(weights, WINDOW, memory=False)
  np.testing.assert_allclose(dca, dca_oracle(weights, WINDOW), **ORACLE_TOL)
  np.testing.assert_allclose(dca[:, :WINDOW], window_only[:, :WINDOW], **ORACLE_TOL)
  assert np.abs(dca[:, WINDOW:] - window_only[:, WINDOW:]).max() > 1e-2


def test_data_dependent_decay_matters():
  """Changing only the decay weights changes the output once tokens are in memory."""
  params = random_params(4)
  x = random_x(5, (BATCH, TIME, D_MODEL))
  base = np.asarray(_compress(_weights(params, x), window=WINDOW))
  other = params._replace(decay=-params.decay)
  changed = np.asarray(_compress(_weights(other, x), window=WINDOW))
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
  state = DCAState(state.keys, state.values, state.key_features, state.doc, memory0)
  expected = dca_oracle(weights, WINDOW, reset, ROTARY, memory0)

  @jax.jit
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
# Decoding and chaining.


@pytest.mark.parametrize("time,window,rotary_base", [(1, 4, ROTARY), (4, 4, ROTARY),
                                                    (13, 4, ROTARY), (9, 1, None)])
def test_decode_steps_equal_whole_sequence(time, window, rotary_base):
  weights = random_weights(time + window, BATCH, time, window)
  full, full_state = _compress(weights, window=window, rotary_base=rotary_base, return_state=True)
  state = init_state(BATCH, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, window)
  outs = []
  for t in range(time):
    o_t, state = _step(state, step_weights(weights, t), rotary_base=rotary_base)
    outs.append(o_t)
  chex.assert_trees_all_close(jnp.stack(outs, 1), full, **F32_TOL)
  np.testing.assert_allclose(np.asarray(full), dca_oracle(weights, window, None, rotary_base),
                             **ORACLE_TOL)
  assert_states_close(state, full_state, rtol=1e-5, atol=1e-5)


def test_decode_after_prefill_equals_whole_sequence():
  weights = random_weights(11)
  full = _compress(weights, window=WINDOW)
  _, state = _compress(slice_time(weights, 0, WINDOW), window=WINDOW, return_state=True)
  outs = []
  for t in range(WINDOW, TIME):
    o_t, state = _step(state, step_weights(weights, t), rotary_base=ROTARY)
    outs.append(o_t)
  chex.assert_trees_all_close(jnp.stack(outs, 1), full[:, WINDOW:], **F32_TOL)


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
  full, full_state = _compress(weights, reset=reset, **kwargs)
  first, state = _compress(slice_time(weights, 0, split), reset=reset[:, :split], **kwargs)
  second, state = _compress(slice_time(weights, split, time), reset=reset[:, split:], state=state,
                            **kwargs)
  chex.assert_trees_all_close(jnp.concatenate([first, second], 1), full, **F32_TOL)
  assert_states_close(state, full_state, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(full), dca_oracle(weights, WINDOW, reset), **ORACLE_TOL)


# ---------------------------------------------------------------------------------------------
# Resets.


def test_reset_equals_separate_documents():
  weights = random_weights(13)
  starts = [0, 3, 4]             # documents of 3, 1 and 9 tokens (the last one past the window)
  reset = jnp.zeros((BATCH, TIME), bool).at[:, jnp.array(starts[1:])].set(True)
  packed = _compress(weights, window=WINDOW, reset=reset)
  for start, stop in zip(starts, starts[1:] + [TIME]):
    alone = _compress(slice_time(weights, start, stop), window=WINDOW)
    chex.assert_trees_all_close(packed[:, start:stop], alone, **F32_TOL)


def test_reset_at_first_token_drops_carried_state():
  weights = random_weights(14)
  _, state = _compress(slice_time(weights, 0, 4), window=WINDOW, return_state=True)
  reset = jnp.zeros((BATCH, 9), bool).at[:, 0].set(True)
  carried = _compress(slice_time(weights, 4, TIME), window=WINDOW, reset=reset, state=state)
  fresh = _compress(slice_time(weights, 4, TIME), window=WINDOW)
  chex.assert_trees_all_close(carried, fresh, **F32_TOL)


# ---------------------------------------------------------------------------------------------
# Gradients.


def _loss(params, x, cotangent, reset, window, mode, chunk, rotary_base=ROTARY):
  o = attention_compress(compute_weights(params, x), window=window, reset=reset, mode=mode,
                         chunk_size=chunk, rotary_base=rotary_base)
  return jnp.sum(o * cotangent)


@jax.jit(static_argnames="window")
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
    @jax.jit
    def reference(params, x, cotangent):
      weights = compute_weights(params, x)
      o, vjp = jax.vjp(lambda p: dca_dense(compute_weights(p, x), window, reset), params)
      return weights, o, vjp(cotangent)[0]
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)
    weights64, o64, ref = reference(to64(params), to64(x), to64(cotangent))
    weights64, o64 = jax.tree.map(np.asarray, weights64), np.asarray(o64)
    ref = jax.tree.map(lambda a: np.asarray(a, np.float64), ref)

  # The two oracles are independent codings of the equations: they agree in float64.
  np.testing.assert_allclose(o64, dca_oracle(weights64, window, reset), rtol=1e-10, atol=1e-10)
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
  got = _compress(w16, window=WINDOW)
  assert got.dtype == jnp.bfloat16
  expected = _compress(w32, window=WINDOW)
  chex.assert_trees_all_close(got.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("time", [3, TIME])   # the softmax shortcut and the engine path
def test_bfloat16_end_to_end(time):
  params = random_params(19)
  x = random_x(20, (BATCH, time, D_MODEL))
  got = _compress(_weights(params, x.astype(jnp.bfloat16)), window=WINDOW)
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got.astype(jnp.float32))
  assert np.all(np.isfinite(got))
  expected = np.asarray(_compress(_weights(params, x), window=WINDOW))
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
  weights = _weights(params, x)
  assert float(jnp.max(jnp.abs(weights.q_features))) > 1e3
  assert float(jnp.min(weights.log_decay)) < -10
  reset = random_reset(2, BATCH, TIME, prob=0.3)
  for (mode, chunk), o in every_mode(weights, reset, WINDOW, ROTARY):
    assert np.all(np.isfinite(np.asarray(o))), (mode, chunk)
  o16 = _compress(_weights(params, x.astype(jnp.bfloat16)), window=WINDOW)
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
  chex.assert_trees_all_close(_compress(w, window=4), expected)   # the shortcut is fine
  chex.assert_trees_all_close(_compress(w, window=4, return_state=True)[0], expected)  # NaN
  state = init_state(1, 1, 2, 2, 3, 4)
  chex.assert_trees_all_close(_step(state, step_weights(w, 0))[0], expected[:, 0])      # NaN


# ---------------------------------------------------------------------------------------------
# adaptive_scale and half_life_bias.


def test_adaptive_scale_plans():
  assert adaptive_scale(1, window=8).kind is PlanKind.SOFTMAX
  assert adaptive_scale(8, window=8).kind is PlanKind.SOFTMAX
  assert adaptive_scale(8, window=8).engine is None
  # Otherwise the compressed plan, whose engine form is the planner's for the memory's sizes
  # (F features, V + 1 value columns: the normaliser rides along as a value).
  for length, window, has_state in ((9, 8, False), (4, 8, True), (1, 8, True), (5000, 64, False)):
    for backend in ("cpu", "gpu"):
      for needs_grad in (False, True):
        plan = adaptive_scale(length, window=window, feature_dim=15, value_dim=6,
                              has_state=has_state, backend=backend, needs_grad=needs_grad)
        assert plan.kind is PlanKind.COMPRESSED
        assert plan.engine == plan_engine(length, 15, 7, backend=backend, needs_grad=needs_grad)
        assert plan.engine.mode is not Mode.AUTO
  for plan in (adaptive_scale(1, window=8, decoding=True),
               adaptive_scale(1, window=8, has_state=True, decoding=True)):
    assert plan.kind is PlanKind.STEP and plan.engine is None


@pytest.mark.parametrize("kwargs,name", [
    (dict(sequence_length=0, window=4), "sequence_length"),
    (dict(sequence_length=2.5, window=4), "sequence_length"),
    (dict(sequence_length=True, window=4), "sequence_length"),
    (dict(sequence_length=4, window=0), "window"),
    (dict(sequence_length=4, window=-3), "window"),
    (dict(sequence_length=4, window=None), "window"),
])
def test_adaptive_scale_rejects_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    adaptive_scale(kwargs.pop("sequence_length"), **kwargs)


@pytest.mark.parametrize("num_heads,window", [(1, 8), (2, 5), (4, 16), (7, 64)])
def test_half_life_bias(num_heads, window):
  bias = np.asarray(half_life_bias(num_heads, window), np.float64)
  log_decay = -np.logaddexp(0.0, bias)                             # -softplus, decay weights 0
  half_lives = np.log(0.5) / log_decay
  if num_heads == 1:
    np.testing.assert_allclose(half_lives, [window], rtol=1e-5)
    return
  expected = window * 16.0 ** (np.arange(num_heads) / (num_heads - 1))
  np.testing.assert_allclose(half_lives, expected, rtol=1e-4)
  np.testing.assert_allclose(np.exp(log_decay * expected), 0.5, rtol=1e-5)
  ratios = half_lives[1:] / half_lives[:-1]
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-4)        # geometric
  assert half_lives[0] == pytest.approx(window, rel=1e-5)
  assert half_lives[-1] == pytest.approx(16 * window, rel=1e-4)


def test_init_params_decay_is_the_half_life_at_init():
  """Through compute_weights with the initial (zero) decay weights: a_h^{half-life_h} = 1/2."""
  window = 6
  params = init_params(jax.random.key(0), D_MODEL, HEADS, window=window, head_dim=HEAD_DIM,
                       value_dim=VALUE_DIM, feature_dim=FEAT)
  assert not np.any(np.asarray(params.decay))
  weights = _weights(params, random_x(1, (BATCH, TIME, D_MODEL)))
  log_decay = np.asarray(weights.log_decay, np.float64)
  half_lives = np.array([window, 16 * window])                     # HEADS = 2: W and 16 W
  np.testing.assert_allclose(np.exp(log_decay * half_lives), 0.5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Input checks of the ops.


def _good():
  return random_weights(23), init_state(BATCH, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, WINDOW)


@pytest.mark.parametrize("field,bad,name", [
    ("q", lambda x: x[..., 0], "weights.q"),
    ("k", lambda x: x[..., :-2], "weights.k"),
    ("v", lambda x: x[..., :1, :], "weights.v"),
    ("q_features", lambda x: x[..., :1, :], "weights.q_features"),
    ("k_features", lambda x: x[..., :-1], "weights.k_features"),
    ("log_decay", lambda x: x[..., None], "weights.log_decay"),
    ("log_decay", lambda x: x[..., :1], "weights.log_decay"),
])
def test_malformed_weights_are_named(field, bad, name):
  weights, state = _good()
  weights = weights._replace(**{field: bad(getattr(weights, field))})
  with pytest.raises(ValueError, match=name):
    attention_compress(weights, window=WINDOW)
  with pytest.raises(ValueError, match=name):
    memory_state_update(state, step_weights(weights, 0))


def test_attention_compress_rejects_bad_arguments():
  weights, state = _good()
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
  weights, _ = _good()
  with pytest.raises(ValueError, match="chunk_size"):
    jax.eval_shape(lambda w: attention_compress(w, window=TIME, chunk_size=0), weights)  # T <= W


@pytest.mark.parametrize("field,bad_shape", [
    ("keys", (BATCH, WINDOW, HEADS, HEAD_DIM + 2)),
    ("values", (BATCH, WINDOW, HEADS, VALUE_DIM + 1)),
    ("key_features", (BATCH, WINDOW, HEADS, NUM_FEATURES - 1)),
    ("doc", (BATCH, WINDOW + 1)),
    ("memory", (BATCH, HEADS, NUM_FEATURES, VALUE_DIM)),
    ("memory", (BATCH + 1, HEADS, NUM_FEATURES, VALUE_DIM + 1)),
])
def test_malformed_state_is_named(field, bad_shape):
  weights, state = _good()
  fields = {name: getattr(state, name) for name in ("keys", "values", "key_features", "doc",
                                                     "memory")}
  fields[field] = jnp.zeros(bad_shape, jnp.int32 if field == "doc" else jnp.float32)
  bad_state = DCAState(**fields)
  with pytest.raises(ValueError, match=f"state.{field}"):
    attention_compress(weights, window=WINDOW, state=bad_state)
  with pytest.raises(ValueError, match=f"state.{field}"):
    memory_state_update(bad_state, step_weights(weights, 0))


def test_memory_state_update_rejects_bad_arguments():
  weights, state = _good()
  with pytest.raises(TypeError, match="state"):
    memory_state_update((state.keys,), step_weights(weights, 0))
  with pytest.raises(ValueError, match="weights.q"):
    memory_state_update(state, weights)   # [B, T, ...] weights where one step is expected
  other_batch = init_state(BATCH + 1, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, WINDOW)
  with pytest.raises(ValueError, match="state.keys"):
    memory_state_update(other_batch, step_weights(weights, 0))


@pytest.mark.parametrize("kwargs,name", [
    (dict(batch_size=0), "batch_size"), (dict(num_heads=0), "num_heads"),
    (dict(key_dim=-1), "key_dim"), (dict(value_dim=1.5), "value_dim"),
    (dict(feature_dim=0), "feature_dim"), (dict(window=0), "window"),
])
def test_init_state_rejects_bad_sizes(kwargs, name):
  sizes = dict(batch_size=1, num_heads=2, key_dim=4, value_dim=4, feature_dim=5, window=3)
  sizes.update(kwargs)
  with pytest.raises(ValueError, match=name):
    init_state(**sizes)


def test_compute_weights_rejects_wrong_width():
  params = random_params(0)
  with pytest.raises(ValueError, match="x"):
    compute_weights(params, jnp.ones((1, 4, D_MODEL + 1)))
  with pytest.raises(ValueError, match="x"):
    compute_weights(params, jnp.ones((D_MODEL,)))


def test_vmap_over_batch_equals_batched_call():
  weights = random_weights(25)
  per_row = jax.jit(jax.vmap(lambda w: attention_compress(
      DCAWeights(*(None if x is None else x[None] for x in w)), window=WINDOW)[0]))(weights)
  chex.assert_trees_all_close(per_row, _compress(weights, window=WINDOW), **F32_TOL)


# ---------------------------------------------------------------------------------------------
# The DCAttention layer.

L_D, L_HEADS, L_WINDOW = 32, 4, 8
LAYER_TOL = dict(rtol=1e-5, atol=2e-5)


# Layer options besides the defaults: gated combination, per-channel decay, short convolution.
LAYER_VARIANTS = (dict(combine="gated", decay="channel", decay_rank=3), dict(short_conv=0),
                  dict(short_conv=1, combine="gated"))


def make_layer(seed=0, **kwargs):
  layer = DCAttention(L_D, L_HEADS, window=L_WINDOW, feature_dim=4, rngs=nnx.Rngs(seed), **kwargs)
  # Random decay, gate and convolution weights so that every part depends on the input.
  keys = iter(jax.random.split(jax.random.key(seed + 1), 4))
  for name, scale in (("decay", 0.5 / math.sqrt(L_D)), ("decay_up", 0.3),
                      ("gate", 1 / math.sqrt(L_D)), ("conv", 0.5)):
    param = getattr(layer, name)
    if param is not None:
      param[...] = param[...] + scale * jax.random.normal(next(keys), param[...].shape)
  return layer


@nnx.jit
def _forward(layer, x, reset=None):
  return layer(x, reset=reset)


@nnx.jit
def _prefill(layer, x, cache):
  return layer.prefill(x, cache)


@nnx.jit
def _decode(layer, x_t, cache):
  return layer.decode_step(x_t, cache)


# T below, equal to and above the window; prefixes below and above it; every variant at T = 21.
@pytest.mark.parametrize("time,split,options", [(5, 2, {}), (L_WINDOW, 3, {}), (21, 13, {}),
                                                (21, 5, {})]
                         + [(21, 5, options) for options in LAYER_VARIANTS])
def test_layer_prefill_and_decode_equal_forward(time, split, options):
  layer = make_layer(**options)
  x = random_x(time, (2, time, L_D))
  full = _forward(layer, x)
  # Two chained prefills, and one prefill of everything.
  y1, cache1 = _prefill(layer, x[:, :split], layer.init_cache(2, 64))
  y2, cache = _prefill(layer, x[:, split:], cache1)
  chex.assert_trees_all_close(jnp.concatenate([y1, y2], 1), full, **LAYER_TOL)
  y_all, cache_all = _prefill(layer, x, layer.init_cache(2, 64))
  chex.assert_trees_all_close(y_all, full, **LAYER_TOL)
  assert_states_close(cache, cache_all, rtol=1e-5, atol=1e-5)
  # A prefill, then token-by-token decoding.
  ys, cache = [y1], cache1
  for t in range(split, time):
    y_t, cache = _decode(layer, x[:, t], cache)
    ys.append(y_t[:, None])
  chex.assert_trees_all_close(jnp.concatenate(ys, 1), full, **LAYER_TOL)
  assert_states_close(cache, cache_all, rtol=1e-5, atol=1e-5)
  # Decoding everything from an empty cache.
  ys, cache = [], layer.init_cache(2, 64)
  for t in range(time):
    y_t, cache = _decode(layer, x[:, t], cache)
    ys.append(y_t)
  chex.assert_trees_all_close(jnp.stack(ys, 1), full, **LAYER_TOL)


@pytest.mark.parametrize("options", ({},) + LAYER_VARIANTS)
def test_layer_reset_equals_separate_documents(options):
  layer = make_layer(3, **options)
  x = random_x(4, (2, 21, L_D))
  starts = [0, 5, 13]            # documents of 5, 8 and 8 tokens
  reset = jnp.zeros((2, 21), bool).at[:, jnp.array(starts[1:])].set(True)
  packed = _forward(layer, x, reset)
  for start, stop in zip(starts, starts[1:] + [21]):
    chex.assert_trees_all_close(packed[:, start:stop], _forward(layer, x[:, start:stop]),
                                **LAYER_TOL)


@pytest.mark.parametrize("options,extra", [({}, 1), (LAYER_VARIANTS[0], 4), (LAYER_VARIANTS[1], 0)])
def test_layer_gradients_reach_every_parameter(options, extra):
  layer = make_layer(5, **options)
  x = random_x(6, (2, 21, L_D))
  cotangent = random_x(7, (2, 21, L_D))

  def loss(layer):
    return jnp.sum(layer(x) * cotangent)

  grads = nnx.jit(nnx.grad(loss))(layer)
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  names = [jax.tree_util.keystr(path) for path, _ in leaves]
  params = jax.tree_util.tree_leaves_with_path(nnx.state(layer, nnx.Param))
  assert sorted(names) == sorted(jax.tree_util.keystr(path) for path, _ in params)
  # query, key, value, feature, decay, decay_bias, out (+ conv by default, + decay_up, gate,
  # gate_bias)
  assert len(names) == 7 + extra, names
  for name, (_, g) in zip(names, leaves):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).max() > 0, name


def test_layer_bfloat16():
  layer = make_layer(8, dtype=jnp.bfloat16)
  x = random_x(9, (2, 21, L_D))
  y = _forward(layer, x)
  assert y.dtype == jnp.bfloat16
  y = np.asarray(y.astype(jnp.float32))
  assert np.all(np.isfinite(y))
  y_t, _ = _decode(layer, x[:, 0], layer.init_cache(2, 10))
  assert y_t.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(y_t.astype(jnp.float32))))
  expected = np.asarray(_forward(make_layer(8), x))
  np.testing.assert_allclose(y, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layer_large_inputs_are_finite(dtype):
  layer = make_layer(8, dtype=dtype)
  x = 30.0 * random_x(9, (2, 21, L_D))
  assert np.all(np.isfinite(np.asarray(_forward(layer, x).astype(jnp.float32))))


def test_layer_decode_step_compiles_once():
  layer = make_layer(10)
  x = random_x(11, (2, 21, L_D))
  traces = []

  @nnx.jit
  def step(layer, x_t, cache):
    traces.append(None)
    return layer.decode_step(x_t, cache)

  cache = layer.init_cache(2, 100)
  ys = []
  for t in range(21):      # past the window, so evictions into memory happen
    y_t, cache = step(layer, x[:, t], cache)
    ys.append(y_t)
  assert len(traces) == 1
  chex.assert_trees_all_close(jnp.stack(ys, 1), _forward(layer, x), **LAYER_TOL)


def test_short_conv_matches_numpy():
  """The causal depthwise convolution, with resets and a history, against a loop in float64."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 5))
  kernel = rng.normal(size=(3, 5))
  history = rng.normal(size=(2, 2, 5))
  reset = np.zeros((2, 9), bool)
  reset[1, 4] = True
  doc = np.cumsum(reset, axis=1)
  expected = np.zeros_like(x)
  for b in range(2):
    for t in range(9):
      for i in range(3):
        j = t - 2 + i
        if j >= 0 and doc[b, j] == doc[b, t]:
          expected[b, t] += kernel[i] * x[b, j]
        elif j < 0 and doc[b, t] == 0:
          pass            # with a reset the history is not seen (see the next assertion)
  got = causal_short_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                          jnp.asarray(reset))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
  # Without reset, a history continues the sequence.
  got = causal_short_conv(jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32),
                          history=jnp.asarray(history, jnp.float32))
  ext = np.concatenate([history, x], axis=1)
  expected = sum(kernel[i] * ext[:, i:i + 9] for i in range(3))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_layer_rejects_bad_options():
  with pytest.raises(ValueError, match="combine"):
    DCAttention(32, 4, combine="sum", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="decay"):
    DCAttention(32, 4, decay="token", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="short_conv"):
    DCAttention(32, 4, short_conv=-1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="decay_rank"):
    DCAttention(32, 4, decay="channel", decay_rank=0, rngs=nnx.Rngs(0))
  layer = make_layer(short_conv=2)
  with pytest.raises(TypeError, match="DCAConvCache"):
    layer.decode_step(random_x(0, (2, L_D)), make_layer(short_conv=0).init_cache(2, 8))


def test_layer_cache_size_does_not_depend_on_max_length():
  layer = make_layer()

  def nbytes(cache):
    return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))

  small, huge = layer.init_cache(2, 1_000), layer.init_cache(2, 1_000_000)
  assert nbytes(small) == nbytes(huge)
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, huge)
  _, cache = _prefill(layer, random_x(0, (2, 21, L_D)), small)
  assert nbytes(cache) == nbytes(small)


def test_layer_parameter_count_is_close_to_softmax():
  layer = nnx.eval_shape(lambda: DCAttention(256, 4, rngs=nnx.Rngs(0)))
  count = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param)))
  softmax = 4 * 256 * 256
  assert softmax < count <= 1.05 * softmax, count


@pytest.mark.parametrize("make,name", [
    (lambda: DCAttention(30, 4, rngs=nnx.Rngs(0)), "num_heads"),
    (lambda: DCAttention(32, 0, rngs=nnx.Rngs(0)), "num_heads"),
    (lambda: DCAttention(32, 4, window=0, rngs=nnx.Rngs(0)), "window"),
    (lambda: DCAttention(32, 4, feature_map="relu", rngs=nnx.Rngs(0)), "feature_map"),
    (lambda: DCAttention(32, 4, mode="fast", rngs=nnx.Rngs(0)), "mode"),
])
def test_layer_rejects_bad_construction(make, name):
  with pytest.raises(ValueError, match=name):
    make()


def test_layer_rejects_bad_input():
  layer = make_layer()
  x = random_x(0, (2, 5, L_D))
  with pytest.raises(ValueError, match="d_model"):
    layer(random_x(0, (2, 5, L_D + 1)))
  with pytest.raises(ValueError, match="x"):
    layer(x[0])
  cache = layer.init_cache(3, 10)
  with pytest.raises(ValueError, match="cache"):
    layer.prefill(x, cache)
  with pytest.raises(ValueError, match="cache"):
    layer.decode_step(x[:, 0], cache)
  cache = layer.init_cache(2, 10)
  with pytest.raises(ValueError, match="x_t"):
    layer.decode_step(x, cache)          # [B, T, D] where [B, D] is expected
  with pytest.raises(ValueError, match="x_t"):
    layer.decode_step(x[:, 0, :-1], cache)
  with pytest.raises(ValueError, match="max_length"):
    layer.init_cache(2, 0)
  with pytest.raises(TypeError, match="cache"):
    layer.decode_step(x[:, 0], (cache.state.keys,))
