"""Fuzz of the public API (hypothesis), run by tests/test_fuzz.py in a child process.

Not collected on its own (the name does not start with test_): a crash of XLA (a segmentation
fault once killed the whole suite here) must fail one test, not take the pytest worker down, so
the parent runs this file with `python -m pytest` and reads its exit status.

What is drawn: every engine form and the planner's choice, per-head and per-channel decay, T up
to 300, H up to 8, K and V up to 64, chunk sizes from 1 to beyond T, resets, an incoming state,
float32 / bfloat16 / float16 inputs and extreme decays (0, -1e4, -inf); every registered layer
with random sizes, options, resets and dtypes. What is checked: no crash, finite outputs and
gradients for finite inputs, agreement between the forms (and between a layer's forward and its
chunked prefill), and the documented error, naming the argument, for each kind of bad input.

Profiles (environment variable DCA_FUZZ_PROFILE): "ci" (a couple of minutes, run by CI) and
"long" (the slow job, `pytest -m slow tests/test_fuzz.py`); DCA_FUZZ_EXAMPLES sets the number of
drawn shapes of the two compiled properties. Everything compiles with XLA's
default options, as users run it.
"""

from __future__ import annotations

import math
import os

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dca_jax
from dca_jax import gated_linear_attention
from dca_jax.nn import LAYERS, layer_spec

# CI draws 4 examples per property; the full job (DCA_TESTS=full, `.ci/full`) draws 10.
hypothesis.settings.register_profile(
    "ci", max_examples=10 if os.environ.get("DCA_TESTS", "") == "full" else 4, deadline=None,
    derandomize=True, print_blob=True)
hypothesis.settings.register_profile("long", max_examples=150, deadline=None, print_blob=True)
PROFILE = os.environ.get("DCA_FUZZ_PROFILE", "ci")
hypothesis.settings.load_profile(PROFILE)
# Each drawn shape of the compiled properties costs a compilation of ~5-10 s: fewer of them in CI
# (2 per property there since the multi-device tests joined CI, 3 took ~80 s in all on
# 2026-12-02; the long profile draws 150).
# DCA_FUZZ_EXAMPLES overrides the count (e.g. a shorter run of the long profile).
COMPILED = hypothesis.settings(max_examples=int(os.environ.get(
    "DCA_FUZZ_EXAMPLES", 2 if PROFILE == "ci" else 150)))

FORMS = ("recurrent", "associative", "chunked", "quadratic", "auto")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Agreement between forms, relative to the output's scale: float32 reorders sums of up to 300
# terms; half precision inputs are cast to float32 inside, then the outputs back.
TOL = {"float32": 2e-4, "bfloat16": 2e-2, "float16": 4e-3}


@st.composite
def engine_cases(draw):
  time = draw(st.integers(1, 300))
  return dict(
      batch=draw(st.integers(1, 2)), time=time, heads=draw(st.integers(1, 8)),
      key_dim=draw(st.sampled_from([1, 3, 8, 16, 64])),
      value_dim=draw(st.sampled_from([1, 5, 8, 32, 64])),
      per_channel=draw(st.booleans()),
      chunk=draw(st.sampled_from([1, 2, 7, 16, 64, time + 5])),
      reset=draw(st.booleans()), state=draw(st.booleans()),
      extreme=draw(st.booleans()), dtype=draw(st.sampled_from(sorted(DTYPES))),
      seed=draw(st.integers(0, 2**16)))


def _engine_inputs(c):
  keys = jax.random.split(jax.random.key(c["seed"]), 7)
  b, t, h, k, v = c["batch"], c["time"], c["heads"], c["key_dim"], c["value_dim"]
  dtype = DTYPES[c["dtype"]]
  q = jax.random.normal(keys[0], (b, t, h, k)) / math.sqrt(k)
  kk = jax.random.normal(keys[1], (b, t, h, k))
  vv = jax.random.normal(keys[2], (b, t, h, v))
  shape = (b, t, h, k) if c["per_channel"] else (b, t, h)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape) + 3.0)
  if c["extreme"]:
    pick = jax.random.randint(keys[4], shape, 0, 12)
    g = jnp.where(pick == 0, -jnp.inf, jnp.where(pick == 1, -1e4, jnp.where(pick == 2, 0.0, g)))
  reset = jax.random.bernoulli(keys[5], 0.05, (b, t)) if c["reset"] else None
  s0 = jax.random.normal(keys[6], (b, h, k, v)) if c["state"] else None
  return [x.astype(dtype) for x in (q, kk, vv)] + [g], reset, s0


@COMPILED
@hypothesis.given(engine_cases())
def test_engine_forms_agree_and_stay_finite(c):
  (q, k, v, g), reset, s0 = _engine_inputs(c)
  forms = [f for f in FORMS if f != "quadratic" or c["time"] <= 128]

  @jax.jit
  def run(q, k, v, g, s0):
    outs, grads = {}, {}
    for form in forms:
      def loss(q, k, v, g, s0, form=form):
        o, s = gated_linear_attention(q, k, v, g, initial_state=s0, reset=reset, mode=form,
                                      chunk_size=c["chunk"], return_final_state=True)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s), (o, s)
      args = (q, k, v, g) if s0 is None else (q, k, v, g, s0)
      argnums = tuple(range(len(args)))
      fn = (lambda *a, loss=loss: loss(*a, None)) if s0 is None else loss
      grads[form], outs[form] = jax.grad(fn, argnums=argnums, has_aux=True)(*args)
    return outs, grads

  outs, grads = run(q, k, v, g, s0)
  tol = TOL[c["dtype"]]
  ref_o, ref_s = (np.asarray(x, np.float32) for x in outs["recurrent"])
  assert np.isfinite(ref_o).all() and np.isfinite(ref_s).all(), c
  for form in forms:
    o, s = (np.asarray(x, np.float32) for x in outs[form])
    scale = 1.0 + np.abs(ref_o).max()
    assert np.abs(o - ref_o).max() <= tol * scale, (form, c)
    assert np.abs(s - ref_s).max() <= tol * (1.0 + np.abs(ref_s).max()), (form, c)
    for i, (got, want) in enumerate(zip(grads[form], grads["recurrent"])):
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      if i == 3:  # d/d log_decay: exp(-inf) has zero derivative, but -inf inputs stay -inf.
        got, want = np.nan_to_num(got), np.nan_to_num(want)
      assert np.isfinite(got).all(), (form, i, c)
      assert np.abs(got - want).max() <= 10 * tol * (1.0 + np.abs(want).max()), (form, i, c)


@st.composite
def layer_cases(draw):
  name = draw(st.sampled_from(sorted(LAYERS)))
  heads = draw(st.integers(1, 4))
  head_dim = draw(st.sampled_from([2, 8, 16]))
  options = {}
  if name in ("dca", "window"):
    options["window"] = draw(st.integers(1, 64))
  if name == "dca":
    options["feature_dim"] = draw(st.sampled_from([2, 4, 8]))
    options["combine"] = draw(st.sampled_from(["unified", "gated"]))
    options["decay"] = draw(st.sampled_from(["head", "channel"]))
    options["short_conv"] = draw(st.sampled_from([0, 2, 4]))
  if name == "gla":
    options["expand_k"] = 1.0
  time = draw(st.integers(1, 300))
  return dict(name=name, heads=heads, d_model=heads * head_dim, options=options, time=time,
              split=draw(st.integers(1, time)), batch=draw(st.integers(1, 2)),
              reset=draw(st.booleans()), dtype=draw(st.sampled_from(["float32", "bfloat16"])),
              seed=draw(st.integers(0, 2**16)))


@COMPILED
@hypothesis.given(layer_cases())
def test_layers_forward_prefill_agree_and_stay_finite(c):
  layer = layer_spec(c["name"]).build(c["d_model"], c["heads"], c["options"],
                                      rngs=nnx.Rngs(c["seed"]))
  graphdef, params = nnx.split(layer)
  keys = jax.random.split(jax.random.key(c["seed"] + 1), 2)
  x = jax.random.normal(keys[0], (c["batch"], c["time"], c["d_model"])).astype(DTYPES[c["dtype"]])
  reset = jax.random.bernoulli(keys[1], 0.05, x.shape[:2]) if c["reset"] else None
  split = c["split"]

  @jax.jit
  def run(params, x):
    def loss(params, x):
      y = nnx.merge(graphdef, params)(x, reset=reset)
      return jnp.sum(y.astype(jnp.float32) ** 2), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(x.shape[0], x.shape[1])
    first, cache = model.prefill(x[:, :split], cache, None if reset is None else reset[:, :split])
    parts = [first]
    if split < x.shape[1]:
      rest, _ = model.prefill(x[:, split:], cache, None if reset is None else reset[:, split:])
      parts.append(rest)
    return y, jnp.concatenate(parts, axis=1), grads

  y, chunked, grads = run(params, x)
  y, chunked = np.asarray(y, np.float32), np.asarray(chunked, np.float32)
  assert np.isfinite(y).all(), c
  assert np.abs(y - chunked).max() <= 20 * TOL[c["dtype"]] * (1.0 + np.abs(y).max()), c
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads)), c


# Bad inputs: each drawn corruption of a valid call must raise the documented error, naming the
# argument that is wrong (never a crash, a trace from inside XLA or a silent NaN).
ENGINE_BAD = [
    ("q", lambda a: a["q"][0], ValueError, "q"),
    ("q", lambda a: a["q"].astype(jnp.int32), TypeError, "q"),
    ("k", lambda a: a["k"][:, :, :, :-1], ValueError, "k"),
    ("v", lambda a: a["v"][:, :-1], ValueError, "v"),
    ("log_decay", lambda a: jnp.abs(a["log_decay"]) + 0.1, ValueError, "log_decay"),
    ("log_decay", lambda a: a["log_decay"][:, 1:], ValueError, "log_decay"),      # wrong T
    ("reset", lambda a: jnp.zeros(a["q"].shape[:2], jnp.int32), TypeError, "reset"),
    ("reset", lambda a: jnp.zeros(a["q"].shape[:1], bool), ValueError, "reset"),
    ("initial_state", lambda a: jnp.zeros((1, 1, 1, 1)), ValueError, "initial_state"),
    ("chunk_size", lambda a: 0, ValueError, "chunk_size"),
    ("chunk_size", lambda a: 2.5, ValueError, "chunk_size"),
    ("mode", lambda a: "flash", ValueError, "mode"),
]


@hypothesis.given(st.sampled_from(ENGINE_BAD), st.integers(2, 20), st.integers(1, 4))
def test_engine_bad_inputs_raise_the_documented_error(bad, time, heads):
  field, corrupt, error, name = bad
  key = jax.random.key(time)
  args = dict(q=jax.random.normal(key, (1, time, heads, 4)),
              k=jax.random.normal(key, (1, time, heads, 4)),
              v=jax.random.normal(key, (1, time, heads, 3)),
              log_decay=-jnp.ones((1, time, heads)), reset=None, initial_state=None,
              chunk_size=None, mode="auto")
  args[field] = corrupt(args)
  with pytest.raises(error, match=name):
    gated_linear_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay"),
                           **args)


LAYER_BAD = [
    ("x", lambda x: x[..., :-1], ValueError, "x"),
    ("x", lambda x: x.astype(jnp.int32), TypeError, "x"),
    ("x", lambda x: x[0], ValueError, "x"),
    ("x", lambda x: x[:, :0], ValueError, "x"),
    ("reset", lambda x: jnp.zeros(x.shape[:1], bool), ValueError, "reset"),
    ("reset", lambda x: jnp.zeros(x.shape[:2], jnp.float32), TypeError, "reset"),
]


@hypothesis.given(st.sampled_from(sorted(LAYERS)), st.sampled_from(LAYER_BAD), st.integers(1, 12))
def test_layer_bad_inputs_raise_the_documented_error(name, bad, time):
  field, corrupt, error, arg = bad
  options = {"window": 4} if name in ("dca", "window") else {}
  layer = layer_spec(name).build(16, 2, options, rngs=nnx.Rngs(0))
  x = jnp.ones((2, time, 16))
  reset = None
  if field == "x":
    x = corrupt(x)
  else:
    reset = corrupt(x)
  with pytest.raises(error, match=arg):
    layer(x, reset=reset)
  if field == "reset":
    cache = layer.init_cache(2, time + 1)
    with pytest.raises(error, match=arg):
      layer.decode_step(x[:, 0], cache, reset=jnp.zeros((3,), bool) if error is ValueError
                        else jnp.zeros((2,), jnp.float32))


def test_dca_glossary_bad_inputs_name_the_argument():
  params = dca_jax.init_params(jax.random.key(0), 16, 2, window=4)
  weights = dca_jax.compute_weights(params, jnp.ones((1, 6, 16)))
  for call, name in [
      (lambda: dca_jax.attention_compress(weights, window=0), "window"),
      (lambda: dca_jax.attention_compress(weights, window=4, chunk_size=-1), "chunk_size"),
      (lambda: dca_jax.attention_compress(weights, window=4, mode="fast"), "mode"),
      (lambda: dca_jax.compute_weights(params, jnp.ones((1, 6, 15))), "x"),
      (lambda: dca_jax.adaptive_scale(0, window=4), "sequence_length"),
      (lambda: dca_jax.init_params(jax.random.key(0), 16, 2, window=4, feature_dim=0),
       "feature_dim"),
  ]:
    with pytest.raises((ValueError, TypeError), match=name):
      call()
