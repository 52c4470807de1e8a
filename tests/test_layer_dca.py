"""What is particular to the `DCAttention` layer; its share of the layer contract is in
test_layers.py and its mechanism (the ops) in test_attention_compress.py and its neighbours."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dca_jax.nn import DCAttention
from dca_jax.ops import segment_length as ops_segment_length
from oracles import DCA_LAYER_VARIANTS, dca_noise, layer_decode, layer_forward, random_x, randomize

L_D, L_HEADS, L_WINDOW = 32, 4, 8

def make_layer(seed=0, **kwargs):
  layer = DCAttention(L_D, L_HEADS, window=L_WINDOW, feature_dim=4, rngs=nnx.Rngs(seed), **kwargs)
  # Random decay, gate and convolution weights so that every part depends on the input.
  return randomize(layer, dca_noise(L_D), seed)


def test_layer_bfloat16():
  """A bfloat16 layer past its window stays close to the float32 one (and returns x's dtype)."""
  layer = make_layer(8, dtype=jnp.bfloat16)
  x = random_x(9, (2, 21, L_D))
  y = layer_forward(layer, x)
  assert y.dtype == jnp.float32
  y = np.asarray(y.astype(jnp.float32))
  assert np.all(np.isfinite(y))
  y_t, _ = layer_decode(layer, x[:, 0], layer.init_cache(2, 10))
  assert y_t.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(y_t.astype(jnp.float32))))
  expected = np.asarray(layer_forward(make_layer(8), x))
  np.testing.assert_allclose(y, expected, rtol=0.05, atol=0.05 * np.abs(expected).max())


# query, key, value, feature, decay, decay_bias, out (+ conv by default, + decay_up, gate,
# gate_bias); the contract checks that gradients reach each of them.
@pytest.mark.parametrize("options,extra", [({}, 1), (DCA_LAYER_VARIANTS[0], 4), (DCA_LAYER_VARIANTS[1], 0)])
def test_layer_parameters_per_option(options, extra):
  layer = nnx.eval_shape(lambda: make_layer(5, **options))
  names = [jax.tree_util.keystr(path)
           for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(layer, nnx.Param))]
  assert len(names) == 7 + extra, names


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


@pytest.mark.parametrize("make,name", [
    (lambda: DCAttention(32, 4, window=0, rngs=nnx.Rngs(0)), "window"),
    (lambda: DCAttention(32, 4, feature_map="relu", rngs=nnx.Rngs(0)), "feature_map"),
    (lambda: DCAttention(32, 4, mode="fast", rngs=nnx.Rngs(0)), "mode"),
    (lambda: DCAttention(32, 4, window=8, segment_length=4, rngs=nnx.Rngs(0)), "segment_length"),
    (lambda: DCAttention(32, 4, segment_length="fast", rngs=nnx.Rngs(0)), "segment_length"),
])
def test_layer_rejects_bad_construction(make, name):
  with pytest.raises(ValueError, match=name):
    make()


def test_layer_parameter_count_is_close_to_softmax():
  layer = nnx.eval_shape(lambda: DCAttention(256, 4, rngs=nnx.Rngs(0)))
  count = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param)))
  softmax = 4 * 256 * 256
  assert softmax < count <= 1.05 * softmax, count


@pytest.mark.parametrize("options,time,segment", [
    ({}, 29, 8),                       # 3 segments and 5 tokens after them, resets in row 0
    # Whole segments; the delta state's gradient. Slow job only (CI: the chaining a segmented
    # call runs, test_dca_delta.test_prefill_then_steps_equal_one_call, forward).
    pytest.param(dict(memory="delta"), 24, 12, marks=pytest.mark.slow)])
def test_segmented_call_equals_one_pass(options, time, segment):
  """A call as a scan over segments that continue each other's cache (`segment_length`) is the
  one-pass call: outputs and gradients of the input and of every parameter."""
  one_pass = make_layer(11, segment_length=None, **options)
  segmented = make_layer(11, segment_length=segment, **options)
  assert segmented._segment(time) == segment and one_pass._segment(time) is None
  x = random_x(12, (2, time, L_D))
  reset = jnp.zeros((2, time), bool).at[0, jnp.array([3, segment, 2 * segment + 1])].set(True)
  probe = random_x(13, x.shape)

  @nnx.jit
  def value_and_grads(layer, x):
    def loss(layer, x):
      return jnp.sum(probe * layer(x, reset=reset))
    return nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)

  (value, (grad_layer, grad_x)) = value_and_grads(segmented, x)
  (expected, (grad_layer_1, grad_x_1)) = value_and_grads(one_pass, x)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(grad_x, grad_x_1, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(nnx.state(grad_layer, nnx.Param)),
                  jax.tree_util.tree_leaves(nnx.state(grad_layer_1, nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_segment_length_auto_follows_the_planner(monkeypatch):
  """"auto" asks the planner, whose table is empty today (one pass on every backend); with an
  entry, a backend segments from SEGMENT_MIN_T on, never in segments shorter than the window."""
  from dca_jax.ops import planner  # pylint: disable=import-outside-toplevel
  for backend in ("cpu", "gpu", "tpu"):
    assert ops_segment_length(65536, window=64, backend=backend) is None
  monkeypatch.setitem(planner.SEGMENT_LENGTH, "cpu", 1024)
  layer = nnx.eval_shape(lambda: DCAttention(32, 4, window=8, rngs=nnx.Rngs(0)))
  for time in (16, 8192, 16384, 32768):
    expected = ops_segment_length(time, window=8)
    assert layer._segment(time) == (expected if expected and time > expected else None)
  assert ops_segment_length(planner.SEGMENT_MIN_T, window=64, backend="cpu") == 1024
  assert ops_segment_length(planner.SEGMENT_MIN_T, window=2048, backend="cpu") == 2048
  assert ops_segment_length(planner.SEGMENT_MIN_T - 1, window=64, backend="cpu") is None
  assert ops_segment_length(32768, window=64, backend="gpu") is None
  with pytest.raises(ValueError, match="backend"):
    ops_segment_length(32768, window=64, backend="npu")
  with pytest.raises(ValueError, match="sequence_length"):
    ops_segment_length(0, window=64)
