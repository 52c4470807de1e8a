"""The contract of every attention layer, written once over the registry `dca_jax.nn.LAYERS`.

Every registered layer (and every layer registered later) runs each test below: prefill and
decode_step equal the full forward, the documented jit + `lax.scan` pattern, resets equal
separate documents, gradients reach every parameter, bfloat16, large inputs, one compilation of
decode_step, the cache's size, and errors that name the argument. DCA also runs its option
variants where its own tests covered them (`Setup.variants`).

What is particular to one layer (its float64 oracle, softmax's cache overflow, window >= T equals
softmax, parameter counts, constructor options) is in `test_layer_<name>.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracles
from dca_jax.nn import LAYERS
from oracles import (DCA_LAYER_VARIANTS, cache_bytes, dca_noise, fast_jit, layer_decode,
                     layer_forward, layer_prefill, module_jit, normal, randomize)

D_MODEL, HEADS = 32, 4
TOL = dict(rtol=1e-5, atol=2e-5)


@dataclasses.dataclass(frozen=True)
class Setup:
  """How the contract builds and judges one registered layer.

  Attributes:
    options: small keyword options for CPU tests (a small window).
    noise: (parameter, scale) random offsets for parameters that start constant, so that every
      part of the layer depends on the input (see `oracles.randomize`).
    variants: further option sets (over `options`) for the tests that run variants.
    constant_cache: the cache's size does not depend on max_length (False: it grows with it).
    cache_bytes_below: a bound on the constant cache's bytes at batch size 2 (None: no bound).
    lengths: the (T, splits) of the prefill and decode test (None: every one of `LENGTHS`; a
      layer without a window needs no T around it).
  """

  options: dict[str, Any] = dataclasses.field(default_factory=dict)
  noise: tuple[tuple[str, float], ...] = ()
  variants: tuple[dict[str, Any], ...] = ()
  constant_cache: bool = True
  cache_bytes_below: int | None = None
  lengths: tuple[tuple[int, tuple[int, ...]], ...] | None = None


# (T, where the input is cut into two prefills): T below, at and above the window (8), and past
# two blocks of the window op and the engine's quadratic range (T <= 16) for T = 21; cuts before,
# at and after the window.
LENGTHS = ((5, (2, 3)), (8, (3,)), (21, (3, 5, 8, 13)))

# The baselines' short convolution (off by default): its kernel randomised, as DCA's.
CONV_NOISE = (("conv", 0.5),)
SHORT_CONV = (dict(short_conv=4),)

# Per-layer test settings; a layer missing here runs the contract with its default options.
SETUPS: dict[str, Setup] = {
    "dca": Setup(
        options=dict(window=8, feature_dim=4), noise=dca_noise(D_MODEL),
        variants=DCA_LAYER_VARIANTS,
        cache_bytes_below=16 * 1024),
    "softmax": Setup(noise=CONV_NOISE, variants=SHORT_CONV, constant_cache=False),
    "window": Setup(options=dict(window=8), noise=CONV_NOISE, variants=SHORT_CONV,
                    cache_bytes_below=2 * 1024 * 4),
    "linear": Setup(noise=CONV_NOISE, variants=SHORT_CONV, cache_bytes_below=2 * 1024 * 4),
    "gla": Setup(noise=CONV_NOISE, variants=SHORT_CONV, cache_bytes_below=2 * 1024 * 4),
    "gated_deltanet": Setup(noise=(("decay", 0.5 / D_MODEL ** 0.5), ("conv", 0.5)),
                            cache_bytes_below=2 * 1024 * 4, lengths=(LENGTHS[-1],)),
}


def setup(name: str) -> Setup:
  return SETUPS.get(name, Setup())


def test_setups_are_for_registered_layers():
  """A renamed or removed layer must not leave its settings behind unused."""
  assert set(SETUPS) <= set(LAYERS)


def _id(name, variant):
  return "-".join([name] + [f"{k}={v}" for k, v in variant.items()])


def cases(variants: slice | None = None):
  """pytest params (name, options): every registered layer with its test options, then its
  variants `setup.variants[variants]` (none by default)."""
  params = []
  for name in LAYERS:
    s = setup(name)
    params.append(pytest.param(name, s.options, id=name))
    for variant in (s.variants[variants] if variants else ()):
      params.append(pytest.param(name, {**s.options, **variant}, id=_id(name, variant)))
  return params


def make_layer(name, options=None, seed=0, d_model=D_MODEL, num_heads=HEADS, **kwargs):
  """The registered layer `name` with `options` (default: its test options), randomized."""
  s = setup(name)
  layer = LAYERS[name].build(d_model, num_heads, s.options if options is None else options,
                             rngs=nnx.Rngs(seed), **kwargs)
  return randomize(layer, s.noise, seed)


def position(cache):
  """The cache's count of tokens seen (every layer's cache keeps one)."""
  return cache.position


def assert_caches_close(got, expected, what):
  # DCA's states compare on the ring slots they can still read (oracles.live_slots).
  oracles.assert_caches_close(got, expected, custom_message=what, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Equivalences.



# The prefill cases the full job alone runs: the layers without a window below and at the window
# length (their T = 21 case cuts at the same places), and the short-convolution variants but one.
_FULL_ONLY_PREFILL = {f"{name}-T{time}" for name in ("softmax", "linear", "gla") for time in (5, 8)}
_FULL_ONLY_PREFILL |= {"dca-short_conv=0-T21", "dca-short_conv=1-combine=gated-T21",
                       "softmax-short_conv=4-T21", "linear-short_conv=4-T21",
                       "window-short_conv=4-T21"}


def _prefill_cases():
  params = []
  for name in LAYERS:
    s = setup(name)
    for time, splits in s.lengths or LENGTHS:
      params.append(pytest.param(name, s.options, time, splits, id=f"{name}-T{time}"))
    for variant in s.variants:
      params.append(pytest.param(name, {**s.options, **variant}, 21, (5,),
                                 id=f"{_id(name, variant)}-T21"))
  return oracles.ci_cases(params, keep=[i for i, p in enumerate(params)
                                        if p.id not in _FULL_ONLY_PREFILL])


@pytest.mark.parametrize("name,options,time,splits", _prefill_cases())
def test_prefill_and_decode_equal_forward(name, options, time, splits):
  layer = make_layer(name, options)
  x = normal((2, time, D_MODEL))
  full = layer_forward(layer, x)

  # One prefill of everything: the reference cache.
  y_all, cache_all = layer_prefill(layer, x, layer.init_cache(2, 32))
  chex.assert_trees_all_close(y_all, full, **TOL, custom_message="one prefill")
  assert int(position(cache_all)) == time

  # Token by token from an empty cache.
  cache, steps = layer.init_cache(2, 32), []
  for t in range(time):
    y_t, cache = layer_decode(layer, x[:, t], cache)
    steps.append(y_t)
  chex.assert_trees_all_close(np.stack(steps, axis=1), full, **TOL, custom_message="decode")
  assert_caches_close(cache, cache_all, "cache after decoding every token")

  for split in splits:
    # Two chained prefills.
    y1, cache1 = layer_prefill(layer, x[:, :split], layer.init_cache(2, 32))
    y2, cache = layer_prefill(layer, x[:, split:], cache1)
    chex.assert_trees_all_close(np.concatenate([y1, y2], axis=1), full, **TOL,
                                custom_message=f"prefills split at {split}")
    assert_caches_close(cache, cache_all, f"cache after prefills split at {split}")
    # A prefill, then token by token.
    rest, cache = [], cache1
    for t in range(split, time):
      y_t, cache = layer_decode(layer, x[:, t], cache)
      rest.append(y_t)
    chex.assert_trees_all_close(np.concatenate([y1, np.stack(rest, axis=1)], axis=1), full,
                                **TOL, custom_message=f"prefill of {split}, then decode")
    assert_caches_close(cache, cache_all, f"cache after a prefill of {split} and decoding")
    assert int(position(cache)) == time


@pytest.mark.parametrize("name,options", cases())
def test_jit_prefill_and_decode_in_scan(name, options):
  """The documented pattern: split the module once, merge it inside the scanned step."""
  layer = make_layer(name, options)
  time = 21
  x = normal((2, time, D_MODEL))
  expected = layer_forward(layer, x)
  graphdef, params = nnx.split(layer)

  @fast_jit
  def run(params, x):
    layer = nnx.merge(graphdef, params)
    y0, cache = layer.prefill(x[:, :4], layer.init_cache(x.shape[0], 32))

    def step(cache, x_t):
      y_t, cache = nnx.merge(graphdef, params).decode_step(x_t, cache)
      return cache, y_t

    cache, ys = jax.lax.scan(step, cache, jnp.swapaxes(x[:, 4:], 0, 1))
    return jnp.concatenate([y0, jnp.swapaxes(ys, 0, 1)], axis=1), cache

  y, cache = run(params, x)
  chex.assert_trees_all_close(y, expected, **TOL)
  assert int(position(cache)) == time


# Documents per row of a [3, 21] batch (starts): of 3, 10 and 8 tokens; of 11 and 10; of 5, 8
# and 8: shorter than, as long as and longer than the window (8), and of a single token nowhere.
DOC_TIME = 21
DOC_STARTS = ((0, 3, 13), (0, 11), (0, 5, 13))


def document_reset(time=DOC_TIME):
  return oracles.document_reset(time, DOC_STARTS)


@pytest.mark.parametrize("name,options", cases(variants=slice(None)))
def test_reset_equals_separate_documents(name, options):
  layer = make_layer(name, options)
  x = normal((len(DOC_STARTS), DOC_TIME, D_MODEL))
  y = layer_forward(layer, x, document_reset())
  # Every document alone, moved to t = 0 and padded at the end with other tokens: causality
  # makes the padding irrelevant, and one batch of all documents needs a single compilation.
  docs, alone = [], []
  for row, starts in enumerate(DOC_STARTS):
    for start, end in zip(starts, starts[1:] + (DOC_TIME,)):
      docs.append((row, start, end))
      alone.append(np.concatenate([x[row, start:end],
                                   normal((start + DOC_TIME - end, D_MODEL), 7)]))
  y_alone = layer_forward(layer, np.stack(alone))
  for i, (row, start, end) in enumerate(docs):
    chex.assert_trees_all_close(y[row, start:end], y_alone[i, :end - start], **TOL,
                                custom_message=f"row {row}, document [{start}, {end})")


@pytest.mark.parametrize("name,options", [p for p in cases() if setup(p.values[0]).constant_cache])
def test_segmented_call_equals_one_pass(name, options):
  """A layer with a constant-size cache can run a call as a scan over segments that continue the
  cache (`segment_length`): the same outputs as one pass, across documents and segment edges
  (T = 21 in segments of 8: two whole ones and 5 tokens after). DCA's own tests add gradients."""
  layer = make_layer(name, {**options, "segment_length": 8})
  assert layer._segment(DOC_TIME) == 8
  one_pass = make_layer(name, {**options, "segment_length": None})
  x = normal((len(DOC_STARTS), DOC_TIME, D_MODEL))
  chex.assert_trees_all_close(layer_forward(layer, x, document_reset()),
                              layer_forward(one_pass, x, document_reset()), **TOL)


# ---------------------------------------------------------------------------------------------
# Gradients and dtypes.


@pytest.mark.parametrize("name,options", cases(variants=slice(2)))
def test_gradients_reach_every_parameter(name, options):
  layer = make_layer(name, options)
  # T = 12: past DCA's window (8) in documents of 9 and 11 tokens, and within the engine's
  # quadratic range (compiling the chunked backward pass is slow; the engine's own tests check
  # the gradients of every form).
  time = 12
  x = normal((2, time, D_MODEL))
  cotangent = normal((2, time, D_MODEL), seed=7)
  reset = document_reset(time)[:2]

  def loss(layer):
    # Through the full forward and a prefill that continues a cache (decode_step is a prefill
    # or shares its parts).
    y = layer(x, reset=reset)
    _, cache = layer.prefill(x[:, :5], layer.init_cache(2, time))
    y_cached, _ = layer.prefill(x[:, 5:], cache)
    return jnp.sum(y * cotangent) + jnp.mean(y_cached ** 2)

  grads = module_jit(nnx.grad(loss))(layer)
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
  names = [jax.tree_util.keystr(path) for path, _ in leaves]
  params = jax.tree_util.tree_leaves_with_path(nnx.state(layer, nnx.Param))
  assert sorted(names) == sorted(jax.tree_util.keystr(path) for path, _ in params)
  for name, (_, g) in zip(names, leaves):
    g = np.asarray(g)
    assert np.isfinite(g).all(), name
    assert np.abs(g).max() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("name,options", cases())
def test_bfloat16(name, options):
  layer = make_layer(name, options, dtype=jnp.bfloat16)
  x = normal((2, 12, D_MODEL), dtype=jnp.bfloat16)
  y = layer_forward(layer, x, document_reset(12)[:2])
  assert y.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y, np.float32)).all()
  y, cache = layer_prefill(layer, x[:, :7], layer.init_cache(2, 16))
  y_t, cache = layer_decode(layer, x[:, 7], cache)
  assert y.dtype == y_t.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(y_t, np.float32)).all()
  # The cache stays float32 whatever the compute dtype.
  # float32 states, int32 counters and positions, bool flags: never the compute dtype.
  assert all(leaf.dtype in (jnp.float32, jnp.int32, jnp.bool_)
             for leaf in jax.tree_util.tree_leaves(cache))


@pytest.mark.parametrize("name,options", [(name, setup(name).options) for name in LAYERS])
def test_output_in_input_dtype(name, options):
  """A bfloat16 layer given float32 inputs returns float32."""
  layer = make_layer(name, options, dtype=jnp.bfloat16)
  assert layer_forward(layer, normal((2, 12, D_MODEL))).dtype == jnp.float32


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,options", cases())
def test_large_inputs_are_finite(name, options, dtype):
  layer = make_layer(name, options, dtype=dtype)
  x = 30.0 * normal((2, 21, D_MODEL), seed=9)
  assert np.all(np.isfinite(np.asarray(layer_forward(layer, x).astype(jnp.float32))))


# ---------------------------------------------------------------------------------------------
# Compilation and cache size.


@pytest.mark.parametrize("name,options", cases())
def test_decode_step_compiles_once(name, options):
  layer = make_layer(name, options)
  x = normal((2, 21, D_MODEL))
  traces = []

  @nnx.jit
  def step(layer, x_t, cache):
    traces.append(None)
    return layer.decode_step(x_t, cache)

  cache, ys = layer.init_cache(2, 32), []
  for t in range(21):      # past the window, so that evictions happen
    y_t, cache = step(layer, x[:, t], cache)
    ys.append(y_t)
  assert len(traces) == 1
  chex.assert_trees_all_close(np.stack(ys, axis=1), layer_forward(layer, x), **TOL)


@pytest.mark.parametrize("name,options", cases())
def test_cache_size(name, options):
  """Constant-state layers: the cache's size does not depend on max_length; others' grows."""
  layer = make_layer(name, options)
  small, huge = layer.init_cache(2, 1024), layer.init_cache(2, 1 << 20)
  assert small.position.dtype == jnp.int32
  s = setup(name)
  if not s.constant_cache:
    assert cache_bytes(huge) > cache_bytes(small)
    return
  assert cache_bytes(small) == cache_bytes(huge)
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, huge)
  _, cache = layer_prefill(layer, normal((2, 21, D_MODEL)), small)
  assert cache_bytes(cache) == cache_bytes(small)
  if s.cache_bytes_below is not None:
    assert cache_bytes(small) < s.cache_bytes_below  # far below a KV cache of 1024 tokens


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("name,options", cases())
def test_bad_inputs_name_the_argument(name, options):
  layer = make_layer(name, options)
  x = normal((2, 5, D_MODEL))
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, d_model\].*expected last dim 32, got 31"):
    layer(x[..., :31])
  with pytest.raises(ValueError, match="d_model"):
    layer(normal((2, 5, D_MODEL + 1)))
  with pytest.raises(ValueError, match="x must have rank 3"):
    layer(x[0])
  with pytest.raises(ValueError, match="reset must have shape"):
    layer(x, reset=jnp.zeros((2, 4), bool))
  with pytest.raises(ValueError, match="cache has batch size 3.*batch size 2"):
    layer.prefill(x, layer.init_cache(3, 16))
  with pytest.raises(ValueError, match="cache has batch size 3"):
    layer.decode_step(x[:, 0], layer.init_cache(3, 16))
  with pytest.raises(ValueError, match=r"x_t must have rank 2"):
    layer.decode_step(x, layer.init_cache(2, 16))          # [B, T, D] where [B, D] is expected
  with pytest.raises(ValueError, match="x_t"):
    layer.decode_step(x[:, 0, :-1], layer.init_cache(2, 16))
  with pytest.raises(TypeError, match="cache must be a"):
    layer.prefill(x, {"state": 0})
  cache = layer.init_cache(2, 16)
  with pytest.raises(TypeError, match="cache"):
    layer.decode_step(x[:, 0], tuple(jax.tree_util.tree_leaves(cache))[:1])
  with pytest.raises(ValueError, match="max_length must be an integer >= 1"):
    layer.init_cache(2, 0)
  # A cache from a layer of another configuration.
  other = make_layer(name, options, d_model=64)
  with pytest.raises(ValueError, match="another configuration"):
    layer.prefill(x, other.init_cache(2, 16))


@pytest.mark.parametrize("name,options", cases())
def test_constructor_errors_name_the_argument(name, options):
  spec = LAYERS[name]
  with pytest.raises(ValueError, match="num_heads must divide d_model"):
    spec.build(30, 4, options, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads"):
    spec.build(32, 0, options, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="no_such_option"):
    spec.build(32, 4, {**options, "no_such_option": 1}, rngs=nnx.Rngs(0))
