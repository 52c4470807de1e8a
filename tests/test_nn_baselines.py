"""Tests for the baseline attention layers (softmax, sliding window, linear, gated linear) and
for `dca_jax.ops.rotary`.

The layers share one interface (see `dca_jax/nn/_layer.py`), so most tests are parametrized
over all four: equivalence of the full forward with prefill + decode and with NumPy float64
oracles, resets against separate documents, gradients, dtypes, compile counts, cache sizes and
error messages.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from dca_jax import apply_rotary, rotary_frequencies
from dca_jax.nn import (GatedLinearAttention, LinearAttention, SlidingWindowAttention,
                        SoftmaxAttention)

D_MODEL, HEADS, WINDOW = 32, 4, 8
# Below, equal to and above the window; 21 also takes the engine past its quadratic range
# (T <= 16) into the chunked form, and the window op past two blocks.
LENGTHS = (5, WINDOW, 21)
NAMES = ("softmax", "window", "linear", "gla")
F32_TOL = dict(rtol=1e-5, atol=2e-5)


def make_layer(name, d_model=D_MODEL, num_heads=HEADS, seed=0, **kwargs):
  rngs = nnx.Rngs(seed)
  if name == "softmax":
    return SoftmaxAttention(d_model, num_heads, rngs=rngs, **kwargs)
  if name == "window":
    return SlidingWindowAttention(d_model, num_heads, rngs=rngs, window=kwargs.pop("window", WINDOW),
                                  **kwargs)
  if name == "linear":
    return LinearAttention(d_model, num_heads, rngs=rngs, **kwargs)
  return GatedLinearAttention(d_model, num_heads, rngs=rngs, **kwargs)


def random_x(shape, seed=1, dtype=np.float32):
  # NumPy arrays: slicing them per token costs nothing, where eager jax slices compile each.
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# Jitted entry points: one compilation per layer configuration and shape, reused across tests
# (eager calls compile every primitive for every new shape and made this file minutes slower).
@nnx.jit
def forward(layer, x, reset=None):
  return layer(x, reset=reset)


@nnx.jit
def prefill(layer, x, cache):
  return layer.prefill(x, cache)


@nnx.jit
def decode(layer, x_t, cache):
  return layer.decode_step(x_t, cache)


def cache_bytes(cache):
  return sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(cache))


# NumPy float64 oracles: the layers written as plain loops over the definitions.


def np64(param):
  return np.asarray(param[...], np.float64)


def np_rotary(x, positions, base=10000.0):
  """x [T, H, K] rotated at positions [T], half-split pairs, float64."""
  half = x.shape[-1] // 2
  angles = positions[:, None, None] * base ** (-np.arange(half) * 2.0 / x.shape[-1])
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles),
                         x2 * np.cos(angles) + x1 * np.sin(angles)], axis=-1)


def np_documents(reset_row, time):
  return np.cumsum(reset_row) if reset_row is not None else np.zeros(time, int)


def np_softmax_layer(layer, x, reset, window=None):
  """Causal (optionally windowed) softmax attention with rotary, per batch row."""
  batch, time, _ = x.shape
  split = lambda a: a.reshape(time, layer.num_heads, -1)
  out = np.zeros_like(x)
  for b in range(batch):
    pos = np.arange(time, dtype=np.float64)
    q = np_rotary(split(x[b] @ np64(layer.q_proj.kernel)), pos)
    k = np_rotary(split(x[b] @ np64(layer.k_proj.kernel)), pos)
    v = split(x[b] @ np64(layer.v_proj.kernel))
    doc = np_documents(None if reset is None else reset[b], time)
    o = np.zeros_like(v)
    for t in range(time):
      keys = [j for j in range(t + 1)
              if doc[j] == doc[t] and (window is None or t - j < window)]
      s = np.einsum("hk,jhk->hj", q[t], k[keys]) / math.sqrt(layer.head_dim)
      p = np.exp(s - s.max(-1, keepdims=True))
      o[t] = np.einsum("hj,jhv->hv", p / p.sum(-1, keepdims=True), v[keys])
    out[b] = o.reshape(time, -1) @ np64(layer.out_proj.kernel)
  return out


def np_linear_layer(layer, x, reset):
  batch, time, _ = x.shape
  split = lambda a: a.reshape(time, layer.num_heads, -1)
  phi = lambda a: np.where(a > 0, a + 1.0, np.exp(a))
  out = np.zeros_like(x)
  for b in range(batch):
    q = phi(split(x[b] @ np64(layer.q_proj.kernel)))
    k = phi(split(x[b] @ np64(layer.k_proj.kernel)))
    v = split(x[b] @ np64(layer.v_proj.kernel))
    s = np.zeros((layer.num_heads, q.shape[-1], v.shape[-1]))
    z = np.zeros((layer.num_heads, q.shape[-1]))
    o = np.zeros_like(v)
    for t in range(time):
      if reset is not None and reset[b, t]:
        s, z = 0 * s, 0 * z
      s = s + k[t][:, :, None] * v[t][:, None, :]
      z = z + k[t]
      o[t] = np.einsum("hk,hkv->hv", q[t], s) / (np.einsum("hk,hk->h", q[t], z)[:, None] + layer.eps)
    out[b] = o.reshape(time, -1) @ np64(layer.out_proj.kernel)
  return out


def np_gla_layer(layer, x, reset):
  batch, time, _ = x.shape
  split = lambda a: a.reshape(time, layer.num_heads, -1)
  out = np.zeros_like(x)
  for b in range(batch):
    q = split(x[b] @ np64(layer.q_proj.kernel)) / math.sqrt(layer.key_dim)
    k = split(x[b] @ np64(layer.k_proj.kernel))
    v = split(x[b] @ np64(layer.v_proj.kernel))
    logits = x[b] @ np64(layer.gate_down.kernel) @ np64(layer.gate_up.kernel) + np64(layer.gate_up.bias)
    decay = split(1.0 / (1.0 + np.exp(-logits))) ** (1.0 / layer.gate_temperature)
    s = np.zeros((layer.num_heads, layer.key_dim, layer.head_dim))
    o = np.zeros_like(v)
    for t in range(time):
      if reset is not None and reset[b, t]:
        s = 0 * s
      s = decay[t][:, :, None] * s + k[t][:, :, None] * v[t][:, None, :]
      o[t] = np.einsum("hk,hkv->hv", q[t], s)
    o = o / np.sqrt((o ** 2).mean(-1, keepdims=True) + layer.norm.epsilon) * np64(layer.norm.scale)
    g = x[b] @ np64(layer.out_gate.kernel)
    out[b] = (o.reshape(time, -1) * g / (1.0 + np.exp(-g))) @ np64(layer.out_proj.kernel)
  return out


def np_layer(name, layer, x, reset=None):
  x = np.asarray(x, np.float64)
  reset = None if reset is None else np.asarray(reset)
  if name == "softmax":
    return np_softmax_layer(layer, x, reset)
  if name == "window":
    return np_softmax_layer(layer, x, reset, window=layer.window)
  if name == "linear":
    return np_linear_layer(layer, x, reset)
  return np_gla_layer(layer, x, reset)


TIME = 20
# Documents: row 0 of lengths 3, 10, 7; row 1 of lengths 11, 9 (some longer than the window).
DOC_STARTS = ((0, 3, 13), (0, 11))


def example_reset(time=TIME):
  reset = np.zeros((2, time), bool)
  for row, starts in enumerate(DOC_STARTS):
    reset[row, [s for s in starts if s < time]] = True
  return jnp.asarray(reset)


# Equivalences.


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_float64_oracle(name):
  layer = make_layer(name)
  x = random_x((2, TIME, D_MODEL))
  # Row 0 holds three documents, row 1 a single one (the no-reset case; one compilation).
  reset = np.zeros((2, TIME), bool)
  reset[0, list(DOC_STARTS[0])] = True
  np.testing.assert_allclose(forward(layer, x, reset), np_layer(name, layer, x, reset),
                             rtol=1e-4, atol=2e-5)


# Where the input is cut into two prefills: before, at and after the window.
SPLITS = {5: (2,), WINDOW: (3,), 21: (WINDOW, 13)}


@pytest.mark.parametrize("time", LENGTHS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_prefill_and_decode(name, time):
  layer = make_layer(name)
  x = random_x((2, time, D_MODEL))
  expected = forward(layer, x)

  # Token by token from an empty cache.
  cache = layer.init_cache(2, 32)
  steps = []
  for t in range(time):
    y_t, cache = decode(layer, x[:, t], cache)
    steps.append(y_t)
  chex.assert_trees_all_close(np.stack(steps, axis=1), expected, **F32_TOL)
  assert int(cache.position) == time

  # A prefill, then token by token.
  y, cache = prefill(layer, x[:, :3], layer.init_cache(2, 32))
  rest = []
  for t in range(3, time):
    y_t, cache = decode(layer, x[:, t], cache)
    rest.append(y_t)
  chex.assert_trees_all_close(np.concatenate([y, np.stack(rest, axis=1)], axis=1), expected,
                              **F32_TOL)

  # Two chained prefills.
  for split in SPLITS[time]:
    y1, cache = prefill(layer, x[:, :split], layer.init_cache(2, 32))
    y2, cache = prefill(layer, x[:, split:], cache)
    chex.assert_trees_all_close(np.concatenate([y1, y2], axis=1), expected, **F32_TOL)
    assert int(cache.position) == time


@pytest.mark.parametrize("name", NAMES)
def test_jit_prefill_and_decode_in_scan(name):
  """The documented pattern: split the module once, merge it inside the scanned step."""
  layer = make_layer(name)
  time = 21
  x = random_x((2, time, D_MODEL))
  expected = forward(layer, x)
  graphdef, params = nnx.split(layer)

  @jax.jit
  def run(params, x):
    layer = nnx.merge(graphdef, params)
    y0, cache = layer.prefill(x[:, :4], layer.init_cache(x.shape[0], 32))

    def step(cache, x_t):
      y_t, cache = nnx.merge(graphdef, params).decode_step(x_t, cache)
      return cache, y_t

    cache, ys = jax.lax.scan(step, cache, jnp.swapaxes(x[:, 4:], 0, 1))
    return jnp.concatenate([y0, jnp.swapaxes(ys, 0, 1)], axis=1), cache

  y, cache = run(params, x)
  chex.assert_trees_all_close(y, expected, **F32_TOL)
  assert int(cache.position) == time


@pytest.mark.parametrize("name", NAMES)
def test_reset_equals_separate_documents(name):
  layer = make_layer(name)
  x = random_x((2, TIME, D_MODEL))
  y = forward(layer, x, example_reset())
  # Every document alone, moved to t = 0 and padded at the end with other tokens: causality
  # makes the padding irrelevant, and one [5, T, D] batch needs a single compilation.
  docs, alone = [], []
  for row, starts in enumerate(DOC_STARTS):
    for start, end in zip(starts, starts[1:] + (TIME,)):
      docs.append((row, start, end))
      alone.append(np.concatenate([x[row, start:end], random_x((start + TIME - end, D_MODEL), 7)]))
  y_alone = forward(layer, np.stack(alone))
  for i, (row, start, end) in enumerate(docs):
    chex.assert_trees_all_close(y[row, start:end], y_alone[i, :end - start], **F32_TOL)


def test_window_at_least_t_is_softmax():
  """With W >= T the sliding window layer is softmax attention (same parameters)."""
  softmax = make_layer("softmax")
  window = make_layer("window", window=64)
  nnx.update(window, nnx.state(softmax, nnx.Param))
  x = random_x((2, TIME, D_MODEL))
  reset = example_reset()
  chex.assert_trees_all_close(forward(window, x, reset), forward(softmax, x, reset), **F32_TOL)


# Gradients and dtypes.


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
  layer = make_layer(name)
  # T = 12 keeps the engine in its quadratic range: compiling the chunked backward pass is
  # slow, and the engine's own tests check the gradients of every form.
  x = random_x((2, 12, D_MODEL))
  reset = example_reset(12)

  def loss(layer):
    # Through the full forward and a prefill that continues a cache (decode_step is a prefill).
    y = layer(x, reset=reset)
    _, cache = layer.prefill(x[:, :5], layer.init_cache(2, 12))
    y_cached, _ = layer.prefill(x[:, 5:], cache)
    return jnp.mean(y ** 2) + jnp.mean(y_cached ** 2)

  grads = nnx.jit(nnx.grad(loss))(layer)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
  assert len(leaves) == len(jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param)))
  for path, g in leaves:
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16(name):
  layer = make_layer(name, dtype=jnp.bfloat16)
  x = random_x((2, 12, D_MODEL), dtype=jnp.bfloat16)
  y = forward(layer, x, example_reset(12))
  assert y.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y, np.float32)).all()
  y, cache = prefill(layer, x[:, :7], layer.init_cache(2, 16))
  y_t, cache = decode(layer, x[:, 7], cache)
  assert y.dtype == y_t.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y_t, np.float32)).all()
  # The cache stays float32 whatever the compute dtype.
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in jax.tree_util.tree_leaves(cache))
  # Outputs come back in the input's dtype.
  assert forward(layer, x.astype(jnp.float32)).dtype == jnp.float32


# Compilation and cache size.


@pytest.mark.parametrize("name", NAMES)
def test_decode_step_compiles_once(name):
  layer = make_layer(name)
  x = random_x((2, 6, D_MODEL))
  # chex counts traces per function code, shared by the parametrizations of this test.
  chex.clear_trace_counter()

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def step(layer, x_t, cache):
    return layer.decode_step(x_t, cache)

  cache = layer.init_cache(2, 16)
  ys = []
  for t in range(6):
    y_t, cache = step(layer, x[:, t], cache)
    ys.append(y_t)
  chex.assert_trees_all_close(np.stack(ys, axis=1), forward(layer, x), **F32_TOL)


@pytest.mark.parametrize("name", ("window", "linear", "gla"))
def test_cache_size_is_constant(name):
  layer = make_layer(name)
  small, huge = layer.init_cache(2, 1024), layer.init_cache(2, 1 << 20)
  assert cache_bytes(small) == cache_bytes(huge)
  assert cache_bytes(small) < 2 * 1024 * 4  # far below a KV cache of 1024 tokens
  assert small.position.dtype == jnp.int32


def test_softmax_cache_grows_with_max_length():
  layer = make_layer("softmax")
  small, large = cache_bytes(layer.init_cache(2, 1024)), cache_bytes(layer.init_cache(2, 2048))
  # Keys and values: 2 rows x L x D float32 each, plus the int32 counter.
  assert small == 2 * 2 * 1024 * D_MODEL * 4 + 4
  assert large - 4 == 2 * (small - 4)


def test_parameter_counts():
  counts = {}
  for name in NAMES:
    layer = make_layer(name, d_model=256, num_heads=4)
    counts[name] = sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param)))
  print("parameters at d_model=256, 4 heads:", counts)
  assert counts["softmax"] == counts["window"] == counts["linear"] == 4 * 256 ** 2
  gla = make_layer("gla", d_model=256, num_heads=4)
  # The forget gate is low rank (256 -> 16 -> 128), not a full 256 x 128 matrix.
  assert gla.gate_down.kernel.shape == (256, 16)
  assert gla.gate_up.kernel.shape == (16, 128)
  assert abs(counts["gla"] / counts["softmax"] - 1) < 0.15


# Errors.


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_name_the_argument(name):
  layer = make_layer(name)
  x = random_x((2, 5, D_MODEL))
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\].*expected last dim 32, got 31"):
    layer(x[..., :31])
  with pytest.raises(ValueError, match="x must have rank 3"):
    layer(x[0])
  with pytest.raises(ValueError, match="cache has batch size 3.*batch size 2"):
    layer.prefill(x, layer.init_cache(3, 16))
  with pytest.raises(ValueError, match="cache has batch size 3"):
    layer.decode_step(x[:, 0], layer.init_cache(3, 16))
  with pytest.raises(ValueError, match=r"x_t must have rank 2"):
    layer.decode_step(x, layer.init_cache(2, 16))
  with pytest.raises(TypeError, match="cache must be a"):
    layer.prefill(x, {"state": 0})
  with pytest.raises(ValueError, match="reset must have shape"):
    layer(x, reset=jnp.zeros((2, 4), bool))
  with pytest.raises(ValueError, match="num_heads must divide d_model"):
    make_layer(name, d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
    layer.init_cache(2, 0)
  # A cache from a layer of another configuration.
  other = make_layer(name, d_model=64, num_heads=4)
  with pytest.raises(ValueError, match="another configuration"):
    layer.prefill(x, other.init_cache(2, 16))


def test_softmax_cache_overflow():
  layer = make_layer("softmax")
  x = random_x((2, 5, D_MODEL))
  with pytest.raises(ValueError, match="max_length = 4 is too small"):
    layer.prefill(x, layer.init_cache(2, 4))
  _, cache = prefill(layer, x, layer.init_cache(2, 5))
  with pytest.raises(ValueError, match="max_length = 5 is too small"):
    layer.decode_step(x[:, 0], cache)

  # Under jit the position is unknown at trace time: tokens past max_length give NaN, never a
  # silently wrong number, and the tokens that fit are unaffected.
  y, _ = prefill(layer, x, layer.init_cache(2, 3))
  assert np.isfinite(y[:, :3]).all() and np.isnan(y[:, 3:]).all()
  chex.assert_trees_all_close(y[:, :3], forward(layer, x)[:, :3], **F32_TOL)


def test_other_constructor_errors():
  with pytest.raises(ValueError, match="window must be an integer >= 1"):
    make_layer("window", window=0)
  with pytest.raises(ValueError, match="expand_k"):
    make_layer("gla", expand_k=0.3)
  with pytest.raises(ValueError, match="even for rotary"):
    make_layer("softmax", d_model=12, num_heads=4)


# Rotary embeddings.


def test_rotary_matches_float64_reference():
  x = random_x((2, 7, 3, 16))
  positions = jnp.asarray([[0, 1, 2, 5, 11, 100, 1000], [3, 3, 4, 9, 0, 70, 2]])
  got = apply_rotary(x, positions)
  expected = np.stack([np_rotary(np.asarray(x[b], np.float64), np.asarray(positions[b], np.float64))
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
  q, k = np.asarray(random_x((2, 1, 1, 16), seed=seed))
  shift = max(shift, -min(p, s))
  score = lambda a, b: float(jnp.sum(apply_rotary(jnp.asarray(q), jnp.asarray([a]))
                                     * apply_rotary(jnp.asarray(k), jnp.asarray([b]))))
  # The float64 value of rot(q, p) . rot(k, s) = q . rot(k, s - p).
  exact = float(np.sum(q[0, 0] * np_rotary(k[0].astype(np.float64), np.asarray([s - p], np.float64))))
  scale = np.linalg.norm(q) * np.linalg.norm(k)
  # float32 angles carry ~position * 2^-24 rad of error (documented in apply_rotary).
  assert abs(score(p, s) - exact) <= 1e-5 * scale * (1 + max(p, s))
  assert abs(score(p + shift, s + shift) - exact) <= 1e-5 * scale * (1 + max(p, s) + abs(shift))


def test_rotary_preserves_norm_and_dtype():
  x = random_x((4, 9, 2, 8))
  positions = np.random.default_rng(3).integers(0, 10_000, (4, 9))
  y = apply_rotary(x, positions)
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  assert apply_rotary(x.astype(jnp.bfloat16), positions).dtype == jnp.bfloat16
  # Position 0 is the identity.
  chex.assert_trees_all_close(apply_rotary(x, jnp.zeros(9, jnp.int32)), x)


def test_rotary_errors():
  x = random_x((2, 5, 3, 8))
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
