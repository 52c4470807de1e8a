"""Float64 oracles and input builders shared by the tests (a helper module, not a test file).

Every reference the tests compare the library against is written here once, straight from the
equations, in float64 NumPy (or float64 JAX where a gradient is needed), never from the library:

* `rotary`: half-split rotary positions;
* `window_attention` / `window_attention_dense`: causal softmax over the last W tokens of the same
  document (W = T: causal softmax attention);
* `gla` / `gla_dense`: the gated linear attention recurrence S_t = diag(a_t) S_{t-1} + k_t v_t^T;
* `delta_rule` / `delta_rule_dense`: the gated delta rule
  S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;
* `dca` / `dca_dense`: Dynamic Compression Attention (window softmax + decayed memory);
* `dca_delta` / `dca_delta_dense`: DCA with the delta-rule memory (window + gated read-out);
* `short_conv`: the causal depthwise convolution;
* `softmax_layer`, `linear_layer`, `gla_layer`, `gated_deltanet_layer`: the baseline attention
  layers, built from the above.

Then the builders of inputs (fresh random arrays, never zeros), DCA's small problems and the
jitted entry points that several test files call with the same shapes (each compiled once per
process). Notation as in the package: B batch, T time, H heads, K key dim, V value dim, W window,
F features, D model width.
"""

from __future__ import annotations

import functools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import pytest

from dca_jax import (DCAWeights, attention_compress, compute_weights, init_params, init_state,
                     memory_state_update)

# ---------------------------------------------------------------------------------------------
# Compilation.

# XLA:CPU spends most of a test's time optimising tiny programs. Without LLVM optimisation and with
# the classic fusion emitters a compile is several times cheaper and the arithmetic is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def fast_jit(fn=None, **kwargs):
  """`jax.jit` with a cheap compile on CPU (also usable as a decorator, with or without kwargs)."""
  if fn is None:
    return functools.partial(fast_jit, **kwargs)
  options = FAST_COMPILE if jax.default_backend() == "cpu" else None
  return jax.jit(fn, compiler_options=options, **kwargs)


def module_jit(fn):
  """`fast_jit` for `fn(module, *args)` with a read-only NNX module (split per call, merged inside).

  The compiled program is keyed on the module's graphdef: modules of one structure (layer class,
  options, dtypes) share compilations, whatever their parameter values.
  """

  @functools.partial(fast_jit, static_argnums=0)
  def run(graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)

  @functools.wraps(fn)
  def call(module, *args):
    return run(*nnx.split(module), *args)

  return call


# The attention layers' three entry points (see `dca_jax.nn`), jitted once for every test file.
layer_forward = module_jit(lambda layer, x, reset=None: layer(x, reset=reset))
layer_prefill = module_jit(lambda layer, x, cache: layer.prefill(x, cache))
layer_decode = module_jit(lambda layer, x_t, cache: layer.decode_step(x_t, cache))


def param_count(module):
  """The number of parameter scalars of an NNX module."""
  return sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(module, nnx.Param)))


def cache_bytes(cache):
  """The bytes of every array in a cache pytree."""
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))


# ---------------------------------------------------------------------------------------------
# Inputs.


def normal(shape, seed=1, dtype=np.float32):
  """Standard normal NumPy array (slicing one per token costs nothing, unlike eager jax slices)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def random_x(seed, shape, dtype=jnp.float32):
  """Standard normal jax array from `jax.random.key(seed)`."""
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def random_reset(seed, batch, time, prob=0.2):
  """bool [B, T]: a document starts at each token with probability `prob`."""
  return jnp.asarray(np.random.default_rng(seed).random((batch, time)) < prob)


def document_reset(time, starts):
  """bool [len(starts), T]: row r starts a document at each position in starts[r] (< T)."""
  reset = np.zeros((len(starts), time), bool)
  for row, row_starts in enumerate(starts):
    reset[row, [s for s in row_starts if s < time]] = True
  return jnp.asarray(reset)


def np64(param):
  """An NNX parameter (or array) as a float64 NumPy array."""
  return np.asarray(param[...], np.float64)


# ---------------------------------------------------------------------------------------------
# Oracles of the ops.


def rotary(x, positions, base=10000.0, xp=np):
  """Half-split rotary embedding of x [..., T, H, K] at absolute positions [T], in x's precision.

  Pairs (x_i, x_{i + K/2}) rotate by the angle p * base^(-2i/K). `xp` is np or jnp (the latter
  for differentiable references).
  """
  key_dim = x.shape[-1]
  half = key_dim // 2
  freqs = base ** (-np.arange(0, key_dim, 2, dtype=np.float64) / key_dim)
  angles = xp.asarray(positions)[:, None, None] * xp.asarray(freqs, x.dtype)   # [T, 1, K/2]
  cos, sin = xp.cos(angles), xp.sin(angles)
  x1, x2 = x[..., :half], x[..., half:]
  return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def window_attention(q, k, v, window, scale=None, reset=None):
  """Dense masked softmax in float64: o_t = sum_{t-W<j<=t, doc(j)=doc(t)} softmax_j(s_tj) v_j.

  q, k [B, T, H, K], v [B, T, H, V], reset bool [B, T] or None; s_tj = scale q_t . k_j with
  scale 1 / sqrt(K) by default. Returns [B, T, H, V].
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, time, _, key_dim = q.shape
  scale = 1.0 / np.sqrt(key_dim) if scale is None else scale
  reset = np.zeros((batch, time), bool) if reset is None else np.asarray(reset)
  doc = np.cumsum(reset, axis=1)
  t = np.arange(time)[:, None]
  j = np.arange(time)[None, :]
  mask = (j <= t) & (j > t - window)
  mask = mask[None, None] & (doc[:, None, :, None] == doc[:, None, None, :])  # [B, 1, T, T]
  scores = np.einsum("bthk,bjhk->bhtj", q, k) * scale
  scores = np.where(mask, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhtj,bjhv->bthv", probs, v)


def window_attention_dense(q, k, v, window, reset):
  """`window_attention` in jax (float64 under enable_x64), differentiable: gradient reference."""
  time, key_dim = q.shape[1], q.shape[3]
  doc = jnp.cumsum(reset, axis=1)
  t = jnp.arange(time)[:, None]
  j = jnp.arange(time)[None, :]
  same_doc = doc[:, None, :, None] == doc[:, None, None, :]
  mask = ((j <= t) & (j > t - window))[None, None] & same_doc
  scores = jnp.einsum("bthk,bjhk->bhtj", q, k) / np.sqrt(key_dim)
  probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhtj,bjhv->bthv", probs, v)


def gla(q, k, v, log_decay, initial_state=None, reset=None):
  """The gated linear attention recurrence as an explicit float64 NumPy loop over t.

  S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, S_0 = initial_state (zeros
  if None), the carried state dropped where reset[b, t]. log_decay [B, T, H] (per head) or
  [B, T, H, K] (per channel). Returns (o [B, T, H, V], S_T [B, H, K, V]).
  """
  q, k, v, log_decay = (np.asarray(x, np.float64) for x in (q, k, v, log_decay))
  batch, time, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  if log_decay.ndim == 3:
    log_decay = np.broadcast_to(log_decay[..., None], q.shape)
  decay = np.exp(log_decay)                       # exp(-inf) = 0: the state is erased.
  if initial_state is None:
    state = np.zeros((batch, heads, key_dim, value_dim))
  else:
    state = np.asarray(initial_state, np.float64).copy()
  o = np.zeros((batch, time, heads, value_dim))
  for t in range(time):
    a_t = decay[:, t]
    if reset is not None:
      a_t = np.where(np.asarray(reset)[:, t, None, None], 0.0, a_t)
    state = a_t[..., None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
    o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], state)
  return o, state


def gla_dense(q, k, v, log_decay, initial_state, reset):
  """`gla` in float64 JAX (`lax.scan`), differentiable. Call under `enable_x64`."""
  if log_decay.ndim == 3:
    log_decay = jnp.broadcast_to(log_decay[..., None], q.shape)
  decay = jnp.exp(log_decay)
  if reset is not None:
    decay = jnp.where(reset[:, :, None, None], 0.0, decay)
  if initial_state is None:
    initial_state = jnp.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:], q.dtype)

  def step(state, inputs):
    q_t, k_t, v_t, a_t = inputs
    state = a_t[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

  final, o = jax.lax.scan(step, initial_state, [jnp.swapaxes(x, 0, 1) for x in (q, k, v, decay)])
  return jnp.swapaxes(o, 0, 1), final


def delta_rule(q, k, v, beta, log_decay, initial_state=None, reset=None):
  """The gated delta rule as an explicit float64 NumPy loop over rows, heads and tokens.

  S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T with a_t = exp(log_decay_t) (0 where
  reset[b, t]), o_t = S_t^T q_t, S_0 = initial_state (zeros if None); every step is the matrix
  product of the equation, as written. beta, log_decay [B, T, H]. Returns (o [B, T, H, V],
  S_T [B, H, K, V]).
  """
  q, k, v, beta, log_decay = (np.asarray(x, np.float64) for x in (q, k, v, beta, log_decay))
  batch, time, heads, key_dim = q.shape
  value_dim = v.shape[-1]
  if initial_state is None:
    states = np.zeros((batch, heads, key_dim, value_dim))
  else:
    states = np.asarray(initial_state, np.float64).copy()
  reset = np.zeros((batch, time), bool) if reset is None else np.asarray(reset)
  o = np.zeros((batch, time, heads, value_dim))
  eye = np.eye(key_dim)
  for b in range(batch):
    for h in range(heads):
      state = states[b, h]
      for t in range(time):
        a = 0.0 if reset[b, t] else np.exp(log_decay[b, t, h])   # exp(-inf) = 0: erased.
        k_t, v_t, beta_t = k[b, t, h], v[b, t, h], beta[b, t, h]
        state = a * (eye - beta_t * np.outer(k_t, k_t)) @ state + beta_t * np.outer(k_t, v_t)
        o[b, t, h] = state.T @ q[b, t, h]
      states[b, h] = state
  return o, states


def delta_rule_dense(q, k, v, beta, log_decay, initial_state, reset):
  """`delta_rule` in float64 JAX (`lax.scan`), differentiable. Call under `enable_x64`."""
  decay = jnp.exp(log_decay)
  if reset is not None:
    decay = jnp.where(reset[:, :, None], 0.0, decay)
  if initial_state is None:
    initial_state = jnp.zeros(q.shape[:1] + q.shape[2:] + v.shape[-1:], q.dtype)

  def step(state, inputs):
    q_t, k_t, v_t, beta_t, a_t = inputs
    erase = jnp.einsum("bhk,bhj,bhjv->bhkv", k_t, k_t, state)      # k k^T S
    state = (a_t[..., None, None] * (state - beta_t[..., None, None] * erase)
             + beta_t[..., None, None] * k_t[..., :, None] * v_t[..., None, :])
    return state, jnp.einsum("bhk,bhkv->bhv", q_t, state)

  inputs = [jnp.swapaxes(x, 0, 1) for x in (q, k, v, beta, decay)]
  final, o = jax.lax.scan(step, initial_state, inputs)
  return jnp.swapaxes(o, 0, 1), final


def short_conv(x, kernel, reset=None, history=None):
  """Causal depthwise convolution as a float64 loop: y_t = sum_i kernel_i x_{t - S + 1 + i}.

  x [B, T, C], kernel [S, C]; history [B, S - 1, C] precedes x (zeros if None) as part of the
  first document; taps in another document (reset [B, T]) are left out.
  """
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  batch, time, channels = x.shape
  width = kernel.shape[0]
  past = (np.zeros((batch, width - 1, channels)) if history is None
          else np.asarray(history, np.float64))
  ext = np.concatenate([past, x], axis=1)
  doc = np.zeros((batch, time), int) if reset is None else np.cumsum(np.asarray(reset), axis=1)
  ext_doc = np.concatenate([np.zeros((batch, width - 1), int), doc], axis=1)
  y = np.zeros_like(x)
  for b in range(batch):
    for t in range(time):
      for i in range(width):
        j = t + i                                  # index into ext of x_{t - S + 1 + i}
        if ext_doc[b, j] == doc[b, t]:
          y[b, t] += kernel[i] * ext[b, j]
  return y


# ---------------------------------------------------------------------------------------------
# DCA.


def dca(weights, window, reset=None, rotary_base=10000.0, memory0=None, memory=True):
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
    q, k = rotary(q, positions, rotary_base), rotary(k, positions, rotary_base)
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


def dca_dense(weights, window, reset=None, rotary_base=10000.0):
  """`dca` as dense masked T x T JAX (differentiable; float64 under jax.enable_x64)."""
  q, k, v, qf, kf, log_decay = weights[:6]
  dtype = q.dtype
  if log_decay.ndim == 3:
    log_decay = log_decay[..., None]                                              # [B, T, H, 1]
  log_decay = log_decay.astype(dtype)
  batch, time, _, key_dim = q.shape
  doc = jnp.zeros((batch, time), jnp.int32) if reset is None else jnp.cumsum(reset, axis=1)
  if rotary_base is not None:
    positions = jnp.arange(time, dtype=dtype)
    q, k = rotary(q, positions, rotary_base, xp=jnp), rotary(k, positions, rotary_base, xp=jnp)
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


def _delayed_stream(k, v, beta, window, doc, xp):
  """The delta memory's inputs at step t: k^_{t-W}, v_{t-W}, beta_{t-W} when t - W is in t's
  document, else zeros (k^ = k / sqrt(|k|^2 + 1e-6), as `l2_normalize`)."""
  time = k.shape[1]

  def shift(a):   # a_{t - W} at t, zeros for t < W
    if time <= window:
      return xp.zeros_like(a)
    return xp.concatenate([xp.zeros_like(a[:, :window]), a[:, :time - window]], axis=1)

  unit = k / xp.sqrt((k ** 2).sum(-1, keepdims=True) + 1e-6)
  same = (xp.arange(time)[None, :] >= window) & (shift(doc) == doc)                   # [B, T]
  return (xp.where(same[..., None, None], shift(unit), 0.0),
          xp.where(same[..., None, None], shift(v), 0.0), xp.where(same[..., None], shift(beta), 0.0))


def dca_delta(weights, window, reset=None, rotary_base=10000.0):
  """DCA with the delta memory in float64 NumPy, from its equations (`dca_jax.ops.dca_delta`):

      o_t = window softmax of t + sigmoid(g_t) S_t^T q^_t,
      S_t = a_t (I - beta'_t k'_t k'_t^T) S_{t-1} + beta'_t k'_t v'_t^T (the `delta_rule` oracle)

  with k'_t = k^_{t-W}, v'_t = v_{t-W}, beta'_t = beta_{t-W} when t - W is in t's document (else
  zero), q^ and k^ L2-normalised (eps 1e-6 under the root) and the state dropped at resets."""
  q, k, v, log_decay, gate, beta = (np.asarray(getattr(weights, name), np.float64) for name in
                                    ("q", "k", "v", "log_decay", "gate", "beta"))
  batch, time = q.shape[:2]
  reset_np = np.zeros((batch, time), bool) if reset is None else np.asarray(reset)
  doc = np.cumsum(reset_np, axis=1)
  qr, kr = q, k
  if rotary_base is not None:
    positions = np.arange(time, dtype=np.float64)
    qr, kr = rotary(q, positions, rotary_base), rotary(k, positions, rotary_base)
  window_part = window_attention(qr, kr, v, window, reset=reset_np)
  k_in, v_in, b_in = _delayed_stream(k, v, beta, window, doc, np)
  q_unit = q / np.sqrt((q ** 2).sum(-1, keepdims=True) + 1e-6)
  memory, _ = delta_rule(q_unit, k_in, v_in, b_in, log_decay, reset=reset_np)
  return window_part + memory / (1.0 + np.exp(-gate))[..., None]


def dca_delta_dense(weights, window, reset):
  """`dca_delta` in JAX (differentiable; float64 under jax.enable_x64), reset bool [B, T]."""
  q, k, v, log_decay, gate, beta = (getattr(weights, name) for name in
                                    ("q", "k", "v", "log_decay", "gate", "beta"))
  dtype, time = q.dtype, q.shape[1]
  positions = jnp.arange(time, dtype=dtype)
  qr, kr = rotary(q, positions, ROTARY, xp=jnp), rotary(k, positions, ROTARY, xp=jnp)
  window_part = window_attention_dense(qr, kr, v, window, reset)
  k_in, v_in, b_in = _delayed_stream(k, v, beta.astype(dtype), window, jnp.cumsum(reset, axis=1),
                                     jnp)
  q_unit = q / jnp.sqrt((q ** 2).sum(-1, keepdims=True) + 1e-6)
  memory, _ = delta_rule_dense(q_unit, k_in, v_in, b_in, log_decay.astype(dtype), None, reset)
  return window_part + jax.nn.sigmoid(gate.astype(dtype))[..., None] * memory


# DCA's small problems, shared by the tests of its ops: K != V on purpose, T prime and above W.
D_MODEL, HEADS, HEAD_DIM, VALUE_DIM, FEAT = 16, 2, 8, 6, 4
NUM_FEATURES = 1 + FEAT + FEAT * (FEAT + 1) // 2             # Taylor: F = 15
BATCH, TIME, WINDOW = 2, 13, 4
ROTARY = 10000.0
F32_TOL = dict(rtol=1e-5, atol=1e-5)
ORACLE_TOL = dict(rtol=2e-5, atol=2e-5)

# The variants of the mechanism (`combine`, `decay` of `init_params`) the tests run besides the
# default (unified combination, one rate per head).
VARIANTS = (dict(combine="gated"), dict(decay="channel"), dict(combine="gated", decay="channel"))

jit_weights = fast_jit(compute_weights)
jit_compress = fast_jit(attention_compress,
                        static_argnames=("window", "mode", "chunk_size", "rotary_base", "return_state"))
jit_step = fast_jit(memory_state_update, static_argnames=("rotary_base",))


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


def random_weights(seed, batch=BATCH, time=TIME, window=WINDOW, **variant):
  """`compute_weights` of `random_params(seed)` on fresh inputs [B, T, D_MODEL]."""
  return jit_weights(random_params(seed, window, **variant),
                     random_x(seed + 1000, (batch, time, D_MODEL)))


def slice_time(weights, start, stop):
  return DCAWeights(*(None if x is None else x[:, start:stop] for x in weights))


def step_weights(weights, t):
  return DCAWeights(*(None if x is None else x[:, t] for x in weights))


def weights_and_state(seed=23):
  """Valid arguments for both DCA ops: `random_weights(seed)` and an empty state of their sizes."""
  return random_weights(seed), init_state(BATCH, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, WINDOW)


def live_slots(state):
  """bool [B, W + 1]: the ring slots a decoding state can still read (the last W tokens of each
  row's current document). The other slots (the token that has just left, empty slots, tokens
  of an earlier document) are never read, and the step and whole-sequence forms may leave
  different contents there."""
  slots = state.keys.shape[2]
  held = state.position - slots + (np.arange(slots) - state.position) % slots
  return (held[None] >= state.position - (slots - 1)) & (held[None] >= 0) & (
      held[None] >= np.asarray(state.doc_start)[:, None])


def assert_states_close(got, expected, **tol):
  """Two decoding states (`DCAState`, `DCADeltaState`, or either in a `DCAConvCache`) agree:
  memory and the live ring slots (`live_slots`) within tol, positions and documents exactly."""
  if hasattr(got, "inputs"):           # a DCAConvCache: the inputs kept for the convolution too
    chex.assert_trees_all_close(got.inputs, expected.inputs, **tol, custom_message="inputs")
    got, expected = got.state, expected.state
  np.testing.assert_array_equal(np.asarray(got.doc_start), np.asarray(expected.doc_start),
                                err_msg="state.doc_start")
  np.testing.assert_array_equal(np.asarray(got.position), np.asarray(expected.position),
                                err_msg="state.position")
  live = live_slots(expected)
  for name in ("keys", "values", "key_features", "betas"):
    if not hasattr(expected, name):
      continue
    a, b = np.asarray(getattr(got, name)), np.asarray(getattr(expected, name))
    assert a.shape == b.shape, (name, a.shape, b.shape)
    mask = live.reshape(live.shape[:1] + (1,) + live.shape[1:] + (1,) * (a.ndim - 3))
    chex.assert_trees_all_close(np.where(mask, a, 0.0), np.where(mask, b, 0.0), **tol,
                                custom_message=f"state.{name} (live slots)")
  chex.assert_trees_all_close(got.memory, expected.memory, **tol, custom_message="state.memory")


def assert_caches_close(got, expected, custom_message="", **tol):
  """Two layer or model caches agree: DCA's decoding states (anywhere in the tree) as
  `assert_states_close`, every other array within tol."""
  def is_state(x):
    return hasattr(x, "key_features") or hasattr(x, "betas")
  got_leaves, got_tree = jax.tree_util.tree_flatten(got, is_leaf=is_state)
  exp_leaves, exp_tree = jax.tree_util.tree_flatten(expected, is_leaf=is_state)
  assert got_tree == exp_tree, (custom_message, got_tree, exp_tree)
  for a, b in zip(got_leaves, exp_leaves):
    if is_state(b):
      assert_states_close(a, b, **tol)
    else:
      chex.assert_trees_all_close(a, b, **tol, custom_message=custom_message)


# ---------------------------------------------------------------------------------------------
# Oracles of the baseline layers (`dca_jax.nn`): the projections around the op oracles.


def _heads(layer, x, proj):
  """x [B, T, D] float64 through an `nnx.Linear` kernel, split into heads: [B, T, H, -1]."""
  y = x @ np64(proj.kernel)
  return y.reshape(y.shape[:2] + (layer.num_heads, -1))


def _merge(o):
  return o.reshape(o.shape[:2] + (-1,))


def softmax_layer(layer, x, reset=None, window=None):
  """Causal (optionally windowed) softmax attention with rotary at positions 0..T-1, float64."""
  x = np.asarray(x, np.float64)
  positions = np.arange(x.shape[1], dtype=np.float64)
  q = rotary(_heads(layer, x, layer.q_proj), positions, layer.rotary_base)
  k = rotary(_heads(layer, x, layer.k_proj), positions, layer.rotary_base)
  v = _heads(layer, x, layer.v_proj)
  o = window_attention(q, k, v, x.shape[1] if window is None else window, reset=reset)
  return _merge(o) @ np64(layer.out_proj.kernel)


def linear_layer(layer, x, reset=None):
  """Linear attention, phi = elu + 1: o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps), float64.

  S_t = sum k_j v_j^T and z_t = sum phi(k_j) over the document: the ungated recurrence with a
  column of ones appended to v, whose output is the normaliser.
  """
  x = np.asarray(x, np.float64)
  phi = lambda a: np.where(a > 0, a + 1.0, np.exp(a))
  q, k = phi(_heads(layer, x, layer.q_proj)), phi(_heads(layer, x, layer.k_proj))
  v = _heads(layer, x, layer.v_proj)
  v1 = np.concatenate([v, np.ones(v.shape[:-1] + (1,))], axis=-1)
  o, _ = gla(q, k, v1, np.zeros(q.shape[:3]), reset=reset)
  o = o[..., :-1] / (o[..., -1:] + layer.eps)
  return _merge(o) @ np64(layer.out_proj.kernel)


def gla_layer(layer, x, reset=None):
  """Gated linear attention: decay sigmoid(x W_down W_up + b)^(1 / temperature) per key channel,
  then RMSNorm per head and a SiLU output gate, float64."""
  x = np.asarray(x, np.float64)
  q = _heads(layer, x, layer.q_proj) / math.sqrt(layer.key_dim)
  k = _heads(layer, x, layer.k_proj)
  v = _heads(layer, x, layer.v_proj)
  logits = x @ np64(layer.gate_down.kernel) @ np64(layer.gate_up.kernel) + np64(layer.gate_up.bias)
  decay = (1.0 / (1.0 + np.exp(-logits))) ** (1.0 / layer.gate_temperature)
  log_decay = np.log(decay).reshape(q.shape)
  o, _ = gla(q, k, v, log_decay, reset=reset)
  o = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + layer.norm.epsilon) * np64(layer.norm.scale)
  g = x @ np64(layer.out_gate.kernel)
  return (_merge(o) * g / (1.0 + np.exp(-g))) @ np64(layer.out_proj.kernel)


def _silu(a):
  return a / (1.0 + np.exp(-a))


def _l2(a, eps=1e-6):
  return a / np.sqrt((a ** 2).sum(-1, keepdims=True) + eps)


def gated_deltanet_layer(layer, x, reset=None):
  """Gated DeltaNet in float64: silu(conv([x W_q, x W_k, x W_v])), L2-normalised q / sqrt(K) and
  k, beta = sigmoid(x W_b), log a = -softplus(x W_a + b_a), the `delta_rule` oracle, then RMSNorm
  per head and a SiLU output gate."""
  x = np.asarray(x, np.float64)
  heads, key_dim = layer.num_heads, layer.key_dim
  rows = np.concatenate([x @ np64(layer.q_proj.kernel), x @ np64(layer.k_proj.kernel),
                         x @ np64(layer.v_proj.kernel)], axis=-1)
  if layer.conv is not None:
    rows = short_conv(rows, np64(layer.conv), reset)
  rows = _silu(rows)
  width = heads * key_dim
  split = lambda a: a.reshape(a.shape[:2] + (heads, -1))
  q = _l2(split(rows[..., :width])) / math.sqrt(key_dim)
  k = _l2(split(rows[..., width:2 * width]))
  v = split(rows[..., 2 * width:])
  beta = 1.0 / (1.0 + np.exp(-(x @ np64(layer.beta_proj.kernel))))
  rate = x @ np64(layer.decay) + np64(layer.decay_bias)
  log_decay = -np.logaddexp(0.0, rate)
  o, _ = delta_rule(q, k, v, beta, log_decay, reset=reset)
  o = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + layer.norm.epsilon) * np64(layer.norm.scale)
  return (_merge(o) * _silu(x @ np64(layer.out_gate.kernel))) @ np64(layer.out_proj.kernel)


# ---------------------------------------------------------------------------------------------
# Layers.


def randomize(layer, noise, seed):
  """Adds scale * N(0, 1) to each named parameter the layer has (in the order given).

  Parameters that start constant (DCA's decay weights at zero, its convolution as the identity)
  would leave parts of a layer independent of the input; random offsets give the tests teeth.
  `noise` is a sequence of (parameter name, scale); names the layer lacks (None) are skipped.
  """
  keys = iter(jax.random.split(jax.random.key(seed + 1), max(len(noise), 1)))
  for name, scale in noise:
    param = getattr(layer, name, None)
    if param is not None:
      param[...] = param[...] + scale * jax.random.normal(next(keys), param[...].shape)
  return layer


def dca_noise(d_model):
  """The (parameter, scale) offsets that make every part of a `DCAttention` depend on x."""
  return (("decay", 0.5 / math.sqrt(d_model)), ("decay_up", 0.3), ("gate", 1 / math.sqrt(d_model)),
          ("conv", 0.5))


# `DCAttention` options besides the defaults: gated combination with per-channel decay, no short
# convolution, a width-1 one, the delta-rule memory.
DCA_LAYER_VARIANTS = (dict(combine="gated", decay="channel", decay_rank=3), dict(short_conv=0),
                      dict(short_conv=1, combine="gated"), dict(memory="delta"))


def assert_layer_matches_oracle(layer, oracle, d_model, time=20, starts=(0, 3, 13), **tol):
  """The layer's jitted forward against `oracle(layer, x, reset)` in float64.

  Row 0 of the [2, T, D] input holds documents starting at `starts`, row 1 a single one (the
  no-reset case, in the same compilation).
  """
  x = normal((2, time, d_model))
  reset = np.zeros((2, time), bool)
  reset[0, [s for s in starts if s < time]] = True
  np.testing.assert_allclose(layer_forward(layer, x, reset), oracle(layer, x, reset),
                             **{**dict(rtol=1e-4, atol=2e-5), **tol})


# ---------------------------------------------------------------------------------------------
# CI and the full job.
#
# CI (the README's test command) runs a representative subset: about a third of each property
# test's examples and, for long parametrisations, the cases picked by `ci_cases` (the others are
# marked slow). The full job, `.ci/full`, sets DCA_TESTS=full and runs every test with every
# example: `DCA_TESTS=full pytest -n 2 -m "slow or not slow"`.

FULL = os.environ.get("DCA_TESTS", "") == "full"


def draws(examples: int) -> int:
  """Hypothesis examples for a property test written for `examples`: all of them in the full
  job, a third (at least 2) in CI."""
  return examples if FULL else max(2, -(-examples // 3))


def ci_cases(params, keep) -> list:
  """`params` (values, tuples of values for several argnames, or pytest.param) with those whose
  index is not in `keep` marked slow (run by the full job only)."""
  out = []
  for i, p in enumerate(params):
    if i in keep:
      out.append(p)
    elif isinstance(p, type(pytest.param(None))):
      out.append(pytest.param(*p.values, id=p.id, marks=(*p.marks, pytest.mark.slow)))
    else:
      values = p if isinstance(p, tuple) else (p,)
      out.append(pytest.param(*values, marks=pytest.mark.slow))
  return out


def assert_jvp_rule_matches_plain(rule, plain, args, names, argnums, chunk, rng, log_decay_index):
  """A chunked form with a hand-written JVP rule (`rule`) against plain autodiff of the same
  form (`plain`), both called as f(*args, chunk_size=chunk) -> (o, final) on float64 `args`
  (run inside `jax.enable_x64`): gradients of a random linear loss of o and the final state with
  respect to the inputs `argnums`, and a JVP along those inputs only (the others' tangents
  symbolic zeros), to 1e-10. The tangent of the log decays (`log_decay_index`) is 0 where the
  decay is -inf (a constant there)."""
  w_o, w_s = (jnp.asarray(rng.normal(size=x.shape))
              for x in jax.eval_shape(lambda: rule(*args, chunk_size=chunk)))
  forms = {"rule": rule, "plain": plain}

  def loss(name):
    def value(*a):
      o, final = forms[name](*a, chunk_size=chunk)
      return jnp.sum(o * w_o) + jnp.sum(final * w_s)
    return value

  grads = {n: fast_jit(jax.grad(loss(n), argnums=argnums))(*args) for n in forms}
  tangents = [jnp.asarray(rng.normal(size=x.shape)) for x in args]
  g = args[log_decay_index]
  tangents[log_decay_index] = jnp.where(jnp.isfinite(g), tangents[log_decay_index], 0.0)

  def along(form):
    def tangent_out(t):
      def f(*b):
        full = [b[argnums.index(i)] if i in argnums else a for i, a in enumerate(args)]
        return form(*full, chunk_size=chunk)
      return jax.jvp(f, tuple(args[i] for i in argnums), t)[1]
    return fast_jit(tangent_out)(tuple(tangents[i] for i in argnums))

  jvps = {n: along(f) for n, f in forms.items()}
  for i, ours, theirs in zip(argnums, grads["rule"], grads["plain"]):
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10, err_msg=f"d / d {names[i]}")
  for name, ours, theirs in zip(("o", "final state"), jvps["rule"], jvps["plain"]):
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-10, err_msg=f"jvp of {name}")
