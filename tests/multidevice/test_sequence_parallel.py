"""The engine with T sharded over a mesh axis equals the single-device engine.

For 2, 4 and 8 shards of 8 CPU host devices: outputs, final states and gradients of every input
(initial state included), with resets inside shards and exactly at a shard boundary, local
lengths that are not a multiple of the chunk, both decay shapes and both engine rules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import oracles
from dca_jax import delta_rule_attention, gated_linear_attention

B, H, K, V = 2, 3, 4, 5
LOCAL = 13                       # tokens per shard at 8 shards: not a multiple of the chunk (4)
T = 8 * LOCAL


def _mesh(n):
  return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("seq",))


def _inputs(per_channel: bool):
  keys = jax.random.split(jax.random.key(0), 7)
  q = jax.random.normal(keys[0], (B, T, H, K))
  k = jax.random.normal(keys[1], (B, T, H, K))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(keys[2], (B, T, H, V))
  shape = (B, T, H, K) if per_channel else (B, T, H)
  log_decay = -jax.nn.softplus(jax.random.normal(keys[3], shape))
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], (B, T, H)))
  s0 = jax.random.normal(keys[5], (B, H, K, V))
  reset = jax.random.bernoulli(keys[6], 0.04, (B, T))
  # A reset exactly at the first token of a shard (for 2, 4 and 8 shards) and one inside.
  reset = reset.at[0, T // 2].set(True).at[1, 2 * LOCAL + 5].set(True)
  return q, k, v, log_decay, beta, s0, reset


def _loss(fn):
  def loss(*args):
    o, final = fn(*args)
    return jnp.sum(jnp.sin(o)) + jnp.sum(final * final)
  return loss


def _check(sharded, single, args, n_grad):
  o, final = jax.jit(sharded)(*args)
  o_ref, final_ref = jax.jit(single)(*args)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=1e-5)
  argnums = tuple(range(n_grad))
  grads = jax.jit(jax.grad(_loss(sharded), argnums))(*args)
  grads_ref = jax.jit(jax.grad(_loss(single), argnums))(*args)
  for g, g_ref in zip(grads, grads_ref):
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * scale)


# The slow job draws every case here. In CI the sharded GLA engine runs inside the GLA layer
# (per-channel decays) and DCA's additive memory (per-head), outputs and gradients, and with an
# initial and a final state in test_gla_sharded_every_mode (recurrent form).
@pytest.mark.parametrize("shards, per_channel", [
    pytest.param(n, c, marks=pytest.mark.slow) for n in (2, 4, 8) for c in (False, True)])
def test_gla_sharded_equals_single_device(shards, per_channel):
  q, k, v, log_decay, _, s0, reset = _inputs(per_channel)

  def run(q, k, v, g, s, axis_name=None):
    return gated_linear_attention(q, k, v, g, initial_state=s, reset=reset_local(axis_name),
                                  mode="chunked", chunk_size=4, return_final_state=True,
                                  axis_name=axis_name)

  # The reset mask is closed over: slice this shard's part inside the shard_map.
  def reset_local(axis_name):
    if axis_name is None:
      return reset
    index = jax.lax.axis_index(axis_name)
    return jax.lax.dynamic_slice_in_dim(reset, index * (T // shards), T // shards, axis=1)

  sharded = jax.shard_map(functools.partial(run, axis_name="seq"), mesh=_mesh(shards),
                          in_specs=(P(None, "seq"),) * 4 + (P(),),
                          out_specs=(P(None, "seq"), P()))
  _check(sharded, run, (q, k, v, log_decay, s0), 5)


@pytest.mark.parametrize("mode", ["recurrent", pytest.param("auto", marks=pytest.mark.slow)])
def test_gla_sharded_every_mode(mode):
  q, k, v, log_decay, _, s0, reset = _inputs(False)

  def run(q, k, v, g, r, s, axis_name=None):
    return gated_linear_attention(q, k, v, g, initial_state=s, reset=r, mode=mode,
                                  return_final_state=True, axis_name=axis_name)

  sharded = jax.shard_map(functools.partial(run, axis_name="seq"), mesh=_mesh(4),
                          in_specs=(P(None, "seq"),) * 5 + (P(),),
                          out_specs=(P(None, "seq"), P()))
  o, final = jax.jit(sharded)(q, k, v, log_decay, reset, s0)
  o_ref, final_ref = jax.jit(run)(q, k, v, log_decay, reset, s0)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=1e-5)


# In CI the delta rule's sharded engine runs inside DCA's delta memory (the layer test on 8
# shards: entering states, resets, gradients; the prefill test: the final state); `-m slow` runs
# it here too, with an initial state.
@pytest.mark.parametrize("shards", [pytest.param(n, marks=pytest.mark.slow) for n in (2, 4, 8)])
def test_delta_rule_sharded_equals_single_device(shards):
  q, k, v, log_decay, beta, s0, reset = _inputs(False)

  def run(q, k, v, b, g, r, s, axis_name=None):
    return delta_rule_attention(q, k, v, b, g, initial_state=s, reset=r, mode="chunked",
                                chunk_size=4, return_final_state=True, axis_name=axis_name)

  sharded = jax.shard_map(functools.partial(run, axis_name="seq"), mesh=_mesh(shards),
                          in_specs=(P(None, "seq"),) * 6 + (P(),),
                          out_specs=(P(None, "seq"), P()))
  args = (q, k, v, beta, log_decay, reset, s0)
  o, final = jax.jit(sharded)(*args)
  o_ref, final_ref = jax.jit(run)(*args)
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(final, final_ref, rtol=1e-5, atol=1e-5)
  float_args = lambda q, k, v, b, g, s: sharded(q, k, v, b, g, reset, s)
  single_args = lambda q, k, v, b, g, s: run(q, k, v, b, g, reset, s)
  grads = jax.jit(jax.grad(_loss(float_args), tuple(range(6))))(q, k, v, beta, log_decay, s0)
  grads_ref = jax.jit(jax.grad(_loss(single_args), tuple(range(6))))(q, k, v, beta, log_decay, s0)
  for g, g_ref in zip(grads, grads_ref):
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * scale)


def test_a_nonfinite_token_poisons_only_later_shards_up_to_a_reset():
  q, k, v, log_decay, _, _, _ = _inputs(False)
  v = v.at[0, 3].set(jnp.nan)                      # shard 0 of 4, batch row 0
  reset = jnp.zeros((B, T), bool).at[0, 2 * (T // 4) + 1].set(True)   # inside shard 2
  sharded = jax.shard_map(
      lambda q, k, v, g, r: gated_linear_attention(q, k, v, g, reset=r, axis_name="seq"),
      mesh=_mesh(4), in_specs=(P(None, "seq"),) * 5, out_specs=P(None, "seq"))
  o = jax.jit(sharded)(q, k, v, log_decay, reset)
  o_ref = jax.jit(lambda *a: gated_linear_attention(*a[:4], reset=a[4]))(q, k, v, log_decay,
                                                                         reset)
  np.testing.assert_array_equal(jnp.isnan(o), jnp.isnan(o_ref))
  assert bool(jnp.isnan(o[0, 3:2 * (T // 4) + 1]).all())
  assert not bool(jnp.isnan(o[0, 2 * (T // 4) + 1:]).any()) and not bool(jnp.isnan(o[1]).any())


def test_an_unbound_axis_name_is_a_clear_error():
  # Raised while tracing, so shapes are enough (eager inputs would only add op compilations).
  q, k, v, log_decay, _, _, _ = jax.eval_shape(lambda: _inputs(False))
  with pytest.raises(ValueError, match="axis_name='seq' is not a mesh axis bound here"):
    jax.eval_shape(functools.partial(gated_linear_attention, axis_name="seq"), q, k, v, log_decay)


# DCA: the window crosses shard boundaries (halo) and the memory's state is carried.
_W = 8


def _dca_inputs(memory="additive"):
  from dca_jax import init_params  # pylint: disable=g-import-not-at-top
  params = init_params(jax.random.key(0), d_model=32, num_heads=2, window=_W, memory=memory)
  x = jax.random.normal(jax.random.key(1), (2, 96, 32))
  # Resets at shard boundaries (24 for 4 and 8 shards, 48 for 2) and inside shards.
  reset = jnp.zeros((2, 96), bool).at[0, 24].set(True).at[1, 31].set(True).at[0, 50].set(True)
  return params, x, reset


# In CI the layer tests below cover this path (with the convolution's halo too).
@pytest.mark.parametrize("memory", ["additive", "delta"])
@pytest.mark.parametrize("shards", [pytest.param(n, marks=pytest.mark.slow) for n in (2, 4, 8)])
def test_dca_attention_compress_sharded_equals_single_device(shards, memory):
  from dca_jax import attention_compress, compute_weights  # pylint: disable=g-import-not-at-top
  params, x, reset = _dca_inputs(memory)

  def run(params, x, r, axis_name=None):
    return attention_compress(compute_weights(params, x), window=_W, reset=r, mode="chunked",
                              chunk_size=4, axis_name=axis_name)

  sharded = jax.shard_map(functools.partial(run, axis_name="seq"), mesh=_mesh(shards),
                          in_specs=(P(), P(None, "seq"), P(None, "seq")),
                          out_specs=P(None, "seq"))
  np.testing.assert_allclose(jax.jit(sharded)(params, x, reset), jax.jit(run)(params, x, reset),
                             rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(sharded(p, x, reset))), (0, 1)))(
      params, x)
  grads_ref = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(run(p, x, reset))), (0, 1)))(
      params, x)
  for g, g_ref in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
    scale = float(jnp.max(jnp.abs(g_ref)))
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * scale)


# CI: the delta memory (its sharded engine's entering and final states); the additive one in the
# slow job.
@pytest.mark.parametrize("memory", [pytest.param("additive", marks=pytest.mark.slow), "delta"])
def test_dca_sharded_prefill_continues_and_returns_the_single_device_state(memory):
  """attention_compress(..., axis_name=, state=, return_state=True) on 4 shards: the first shard
  continues an incoming state (its buffered tokens, document start and memory; one device's
  prefill of the first 32 tokens, with a reset among the buffered tokens), and every shard
  returns the state after the whole sequence (ring buffers, document start, memory, position),
  equal to the single-device call's, so decoding can continue from it on one device."""
  from dca_jax import attention_compress, compute_weights, memory_state_update  # pylint: disable=g-import-not-at-top
  params, x, reset = _dca_inputs(memory)

  def run(params, x, r, state, axis_name=None):
    return attention_compress(compute_weights(params, x), window=_W, reset=r, mode="chunked",
                              chunk_size=4, state=state, return_state=True, axis_name=axis_name)

  _, incoming = jax.jit(run)(params, x[:, :32], reset[:, :32], None)
  x, reset = x[:, 32:], reset[:, 32:]                     # 4 shards of 16 tokens, W = 8
  sharded = jax.shard_map(functools.partial(run, axis_name="seq"), mesh=_mesh(4),
                          in_specs=(P(), P(None, "seq"), P(None, "seq"), P()),
                          out_specs=(P(None, "seq"), P()))
  (o, state), (o_ref, state_ref) = (jax.jit(sharded)(params, x, reset, incoming),
                                    jax.jit(run)(params, x, reset, incoming))
  np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
  assert type(state) is type(state_ref)
  for name, got, want in zip(state._fields, state, state_ref):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
  # One decoding step from the sharded prefill's state equals one from the single device's.
  token = compute_weights(params, jax.random.normal(jax.random.key(9), (2, 32)))
  step = jax.jit(memory_state_update)
  for a, b in zip(jax.tree_util.tree_leaves(step(state, token)),
                  jax.tree_util.tree_leaves(step(state_ref, token))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_prefill_with_the_sequence_axis_bound_is_a_clear_error():
  """A layer's prefill inside shard_map over its sequence_axis would continue one cache on every
  shard: a NotImplementedError that says what to use instead (outside shard_map it runs)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dca_jax.nn import DCAttention  # pylint: disable=g-import-not-at-top
  layer = DCAttention(32, 2, window=_W, sequence_axis="seq", rngs=nnx.Rngs(0))
  cache = layer.init_cache(2, 96)
  x = jax.ShapeDtypeStruct((2, 96, 32), jnp.float32)
  sharded = jax.shard_map(lambda x: layer.prefill(x, cache)[0], mesh=_mesh(4),
                          in_specs=P(None, "seq"), out_specs=P(None, "seq"))
  with pytest.raises(NotImplementedError, match="prefill inside jax.shard_map over "
                                                "sequence_axis='seq' \\(4 shards\\)"):
    jax.eval_shape(sharded, x)
  assert jax.eval_shape(layer.prefill, x, cache)[0].shape == (2, 96, 32)


def test_dca_window_longer_than_a_shard_is_a_clear_error():
  from dca_jax import attention_compress, compute_weights  # pylint: disable=g-import-not-at-top
  params, x, _ = jax.eval_shape(_dca_inputs)    # raised while tracing: shapes are enough
  sharded = jax.shard_map(
      lambda p, x: attention_compress(compute_weights(p, x), window=_W, axis_name="seq"),
      mesh=_mesh(8), in_specs=(P(), P(None, "seq")), out_specs=P(None, "seq"))
  with pytest.raises(ValueError, match="window=8 is longer than this shard's 4 tokens"):
    jax.eval_shape(sharded, params, jax.ShapeDtypeStruct((2, 32, 32), x.dtype))


def _check_layer_sharded(layers, x, reset, shards=4):
  """layers = (the layer unsharded, the same layer with sequence_axis="seq"): the second inside
  shard_map over `shards` devices equals the first on one device, outputs and gradients (of
  the parameters and of x)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, params = nnx.split(layers[1])
  single_def, _ = nnx.split(layers[0])

  def sharded(params, x, r):
    return jax.shard_map(lambda p, x, r: nnx.merge(graphdef, p)(x, reset=r), mesh=_mesh(shards),
                         in_specs=(P(), P(None, "seq"), P(None, "seq")),
                         out_specs=P(None, "seq"))(params, x, r)

  def single(params, x, r):
    return nnx.merge(single_def, params)(x, reset=r)

  np.testing.assert_allclose(jax.jit(sharded)(params, x, reset),
                             jax.jit(single)(params, x, reset), rtol=1e-5, atol=1e-5)
  loss = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x, reset))), (0, 1)))
  for g, g_ref in zip(jax.tree_util.tree_leaves(loss(sharded)(params, x)),
                      jax.tree_util.tree_leaves(loss(single)(params, x))):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))))


@pytest.mark.parametrize("shards", [pytest.param(2, marks=pytest.mark.slow), 4,
                                    pytest.param(8, marks=pytest.mark.slow)])
def test_dca_layer_with_sequence_axis_equals_the_unsharded_layer(shards):
  """DCAttention(sequence_axis=...) inside shard_map (convolution halo with a reset inside it,
  window halo, carried memory) == the same layer on one device: outputs and gradients."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dca_jax.nn import DCAttention  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(2), (2, 96, 32))
  # At 4 shards of 24: a reset 2 tokens before a boundary (inside the convolution's history),
  # one at a boundary, one inside a shard.
  reset = jnp.zeros((2, 96), bool).at[0, 46].set(True).at[1, 24].set(True).at[0, 61].set(True)
  layers = [DCAttention(32, 2, window=_W, chunk_size=4, sequence_axis=axis, rngs=nnx.Rngs(0))
            for axis in (None, "seq")]
  _check_layer_sharded(layers, x, reset, shards)


@pytest.mark.parametrize("shards", [pytest.param(2, marks=pytest.mark.slow),
                                    pytest.param(4, marks=pytest.mark.slow), 8])
def test_dca_delta_memory_layer_with_sequence_axis_equals_the_unsharded_layer(shards):
  """DCAttention(memory="delta", sequence_axis=...): the window's halo carries the betas and the
  delta rule's entering state crosses the shards (one all_gather of the affine summaries); in CI
  8 shards of 12 tokens (W = 8), resets at a boundary and inside shards: outputs and gradients."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dca_jax.nn import DCAttention  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(2), (2, 96, 32))
  reset = jnp.zeros((2, 96), bool).at[0, 46].set(True).at[1, 24].set(True).at[0, 61].set(True)
  layers = [DCAttention(32, 2, window=_W, chunk_size=4, memory="delta", sequence_axis=axis,
                        rngs=nnx.Rngs(0)) for axis in (None, "seq")]
  _check_layer_sharded(layers, x, reset, shards)


_LAYER_CASES = [("linear", {"short_conv": 4}), ("gla", {"short_conv": 4}), ("gated_deltanet", {}),
                ("window", {"window": 8, "short_conv": 4}), ("softmax", {"short_conv": 4})]
# CI leaves out Gated DeltaNet: its sharded engine is checked through DCA's delta memory
# (test_dca_delta_memory_layer_with_sequence_axis_equals_the_unsharded_layer).


# CI: 4 shards, every layer but Gated DeltaNet; the slow job adds it and 2 and 8 shards.
@pytest.mark.parametrize("shards", [pytest.param(2, marks=pytest.mark.slow), 4,
                                    pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("attention, options", oracles.ci_cases(
    [pytest.param(*c, id=c[0]) for c in _LAYER_CASES],
    keep=[i for i, c in enumerate(_LAYER_CASES) if c[0] != "gated_deltanet"]))
def test_every_layer_with_sequence_axis_equals_the_unsharded_layer(attention, options, shards):
  """Each baseline layer built with sequence_axis (through the registry, as TransformerLM builds
  it) inside shard_map over 2, 4 or 8 shards == the same layer on one device: outputs and
  gradients, with resets before, at and inside shard boundaries."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dca_jax.nn import layer_spec  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(3), (2, 96, 32))
  reset = jnp.zeros((2, 96), bool).at[0, 46].set(True).at[1, 24].set(True).at[0, 61].set(True)
  spec = layer_spec(attention)
  layers = [spec.build(32, 2, dict(options, sequence_axis=axis), rngs=nnx.Rngs(0))
            for axis in (None, "seq")]
  _check_layer_sharded(layers, x, reset, shards)


# Slow job: CI covers TransformerLM with DCA sharded over "seq" through the training step of
# tests/multidevice/test_data_sequence_training.py (loss, gradient norm and updated parameters).
@pytest.mark.slow
@pytest.mark.parametrize("attention", ["dca", "gla"])
def test_transformer_lm_with_sequence_axis_equals_one_device(attention):
  """TransformerLM with attention_options={"sequence_axis": "seq"} (the one option) inside
  shard_map over 4 shards: the same logits and the same loss gradient as on one device."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dca_jax.nn import TransformerConfig, TransformerLM  # pylint: disable=g-import-not-at-top
  options = {"window": 8} if attention == "dca" else {}
  models = [TransformerLM(TransformerConfig(vocab_size=64, d_model=32, num_layers=2,
                                            num_heads=2, attention=attention,
                                            attention_options=dict(options, sequence_axis=axis)),
                          rngs=nnx.Rngs(0)) for axis in (None, "seq")]
  tokens = jax.random.randint(jax.random.key(4), (2, 64), 0, 64)
  graphdef, params = nnx.split(models[1])
  single_def, _ = nnx.split(models[0])

  def sharded(params, tokens):
    return jax.shard_map(lambda p, t: nnx.merge(graphdef, p)(t), mesh=_mesh(4),
                         in_specs=(P(), P(None, "seq")), out_specs=P(None, "seq"))(params, tokens)

  def single(params, tokens):
    return nnx.merge(single_def, params)(tokens)

  np.testing.assert_allclose(jax.jit(sharded)(params, tokens), jax.jit(single)(params, tokens),
                             rtol=1e-5, atol=1e-5)

  def loss(f):
    def value(p):
      logits = f(p, tokens)[:, :-1]
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))
    return jax.jit(jax.grad(value))
  for g, g_ref in zip(jax.tree_util.tree_leaves(loss(sharded)(params)),
                      jax.tree_util.tree_leaves(loss(single)(params))):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(g_ref))))


@pytest.mark.slow
def test_per_device_temporary_memory_falls_with_the_shard_count():
  """XLA's memory analysis of the DCA layer's forward+backward over T = 4096 with T sharded over
  S = 1, 2, 4, 8 devices: the per-device temporary memory falls about as 1/S (within a factor
  of 2 of it: the halo, the summaries and fixed buffers do not shrink)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dca_jax.nn import DCAttention  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(5), (1, 4096, 64))
  temp = {}
  for shards in (1, 2, 4, 8):
    layer = DCAttention(64, 2, window=16, sequence_axis="seq", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)

    def loss(p, x, graphdef=graphdef, shards=shards):
      y = jax.shard_map(lambda p, x: nnx.merge(graphdef, p)(x), mesh=_mesh(shards),
                        in_specs=(P(), P(None, "seq")), out_specs=P(None, "seq"))(p, x)
      return jnp.sum(y ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    temp[shards] = compiled.memory_analysis().temp_size_in_bytes
  for shards in (2, 4, 8):
    ratio = temp[shards] / temp[1]
    assert ratio < 2.0 / shards, (shards, temp)
