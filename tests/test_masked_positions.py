"""No value at a masked position can change an output: the future, another document, an empty
cache slot. NaN and inf are put there for every engine form, the window and softmax ops and every
registered layer; forward outputs and gradients must equal those of the clean input, and exactly
the positions that can see the bad token become NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dca_jax
from dca_jax.nn import LAYERS, layer_spec
from oracles import module_jit

B, T, H, K, V = 2, 12, 2, 4, 3
RESET_AT = 7                              # a second document starts here in every row
BAD_FIRST_DOC, BAD_LAST = 3, T - 1        # where the non-finite values go
LAYER_OPTIONS = {"dca": {"window": 4}, "window": {"window": 4},
                 "dca_delta": {"window": 4, "memory": "delta"}}


def _inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k = (jax.random.normal(keys[i], (B, T, H, K)) for i in range(2))
  v = jax.random.normal(keys[2], (B, T, H, V))
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H)) + 2.0)
  reset = jnp.zeros((B, T), bool).at[:, RESET_AT].set(True)
  return q, k, v, g, reset


def _corrupt(x, position, value):
  return x.at[:, position].set(value)


def _expect(out, ref, poisoned):
  out, ref = np.asarray(out), np.asarray(ref)
  assert np.isnan(out[:, poisoned]).all()
  clean = np.setdiff1d(np.arange(T), poisoned)
  np.testing.assert_allclose(out[:, clean], ref[:, clean], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["recurrent", "associative", "chunked", "quadratic", "auto"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_engine_forms(mode, per_channel):
  q, k, v, g, reset = _inputs()
  if per_channel:
    g = jnp.repeat(g[..., None], K, axis=-1)
  run = jax.jit(lambda q, k, v: dca_jax.gated_linear_attention(q, k, v, g, reset=reset, mode=mode,
                                                               chunk_size=4))
  ref = run(q, k, v)
  # A bad value in the last token (the future of every other) and one in the first document.
  bad_k, bad_v = _corrupt(k, BAD_FIRST_DOC, np.nan), _corrupt(v, BAD_LAST, np.inf)
  _expect(run(q, bad_k, bad_v), ref, np.r_[BAD_FIRST_DOC:RESET_AT, BAD_LAST])
  # Gradients of the clean outputs are those of the clean input, and finite.
  clean = np.r_[:BAD_FIRST_DOC, RESET_AT:BAD_LAST]
  grad = jax.jit(jax.grad(lambda *a: jnp.sum(run(*a)[:, clean]), argnums=(0, 1, 2)))
  for got, want in zip(grad(q, bad_k, bad_v), grad(q, k, v)):
    got, want = np.asarray(got), np.asarray(want)
    keep = np.setdiff1d(np.arange(T), [BAD_FIRST_DOC, BAD_LAST])
    np.testing.assert_allclose(got[:, keep], want[:, keep], rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all()


def test_engine_nonfinite_initial_state_stops_at_a_reset():
  q, k, v, g, reset = _inputs()
  state = jnp.full((B, H, K, V), jnp.nan)
  out = dca_jax.gated_linear_attention(q, k, v, g, reset=reset, initial_state=state)
  ref = dca_jax.gated_linear_attention(q, k, v, g, reset=reset)
  _expect(out, ref, np.r_[:RESET_AT])


@pytest.mark.parametrize("value", [np.nan, -np.inf])
def test_window_and_masked_softmax_ops(value):
  q, k, v, _, reset = _inputs()
  bad_v = _corrupt(v, BAD_LAST, value)
  window = 3
  ref = dca_jax.sliding_window_attention(q, k, v, window=window, reset=reset)
  out = dca_jax.sliding_window_attention(q, _corrupt(k, BAD_FIRST_DOC, value), bad_v,
                                         window=window, reset=reset)
  _expect(out, ref, np.r_[BAD_FIRST_DOC:BAD_FIRST_DOC + window, BAD_LAST])
  doc = dca_jax.document_ids(reset)
  mask = (jnp.tril(jnp.ones((T, T), bool))[None] & (doc[:, :, None] == doc[:, None, :]))
  ref = dca_jax.masked_attention(q, k, v, mask, 0.5)
  _expect(dca_jax.masked_attention(q, k, bad_v, mask, 0.5), ref, [BAD_LAST])


def _layer_and_input(name, seed, d_model=16):
  spec = layer_spec("dca" if name == "dca_delta" else name)
  layer = spec.build(d_model, 2, LAYER_OPTIONS.get(name), rngs=nnx.Rngs(0))
  return layer, jax.random.normal(jax.random.key(seed), (B, T, d_model)), _inputs()[-1]


@pytest.mark.parametrize("name", sorted(LAYERS) + ["dca_delta"])
def test_layers(name):
  layer, x, reset = _layer_and_input(name, 1)
  # module_jit: the cheap compile of the other layer tests (same arithmetic, so clean and corrupt
  # runs still compare within the tolerances below).
  forward = module_jit(lambda model, x: model(x, reset=reset))
  ref = forward(layer, x)
  bad = _corrupt(_corrupt(x, BAD_FIRST_DOC, np.nan), BAD_LAST, np.inf)
  out = forward(layer, bad)
  reach = {"window": 4}.get(name, RESET_AT - BAD_FIRST_DOC)
  _expect(out, ref, np.r_[BAD_FIRST_DOC:BAD_FIRST_DOC + reach, BAD_LAST])
  # Gradients with respect to the parameters and the other tokens are those of the clean input.
  clean = np.r_[:BAD_FIRST_DOC, RESET_AT:BAD_LAST]
  grad = module_jit(nnx.grad(lambda model, x: jnp.sum(model(x, reset=reset)[:, clean]),
                             argnums=(0, 1)))
  got, want = grad(layer, bad), grad(layer, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape[:2] == (B, T):   # the input's gradient: the bad tokens get zero
      a, b = np.delete(a, [BAD_FIRST_DOC, BAD_LAST], axis=1), np.delete(b, [BAD_FIRST_DOC, BAD_LAST], axis=1)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_decode_reset_hides_a_corrupt_document(name):
  """A row whose earlier document held NaN decodes the next document exactly as a clean one."""
  layer, x, reset = _layer_and_input(name, 2)
  prefill = module_jit(lambda model, x, cache: model.prefill(x, cache))
  step = module_jit(lambda model, x_t, cache, reset: model.decode_step(x_t, cache, reset=reset))
  _, cache = prefill(layer, _corrupt(x[:, :RESET_AT], 2, np.nan), layer.init_cache(B, T))
  outs = []
  for t in range(RESET_AT, T):
    y, cache = step(layer, x[:, t], cache, reset[:, t])
    outs.append(y)
  ref = module_jit(lambda model, x: model(x))(layer, x[:, RESET_AT:])
  np.testing.assert_allclose(np.stack(outs, 1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, B])   # batch 1: the steps read before they write
@pytest.mark.parametrize("name", sorted(LAYERS) + ["dca_delta"])
def test_decoding_poisons_what_the_forward_poisons(name, rows):
  """Prefill, steps, a prefill across the reset, steps: the outputs that see a non-finite token
  are NaN exactly where the whole-sequence call's are, the others equal it (the caches carry
  what they have seen of bad tokens; the window's stores them as zeros, `WindowCache.bad_at`)."""
  layer, x, reset = _layer_and_input(name, 3)
  x, reset = x[:rows], reset[:rows]
  bad = _corrupt(_corrupt(x, BAD_FIRST_DOC, np.nan), BAD_LAST, np.inf)
  forward = module_jit(lambda model, x: model(x, reset=reset))
  prefill = module_jit(lambda model, x, cache, reset: model.prefill(x, cache, reset=reset))
  step = module_jit(lambda model, x_t, cache, reset: model.decode_step(x_t, cache, reset=reset))

  def decode(x):
    cache, outs = layer.init_cache(rows, T), []
    for start, stop in ((0, 2), (2, 6), (6, 9), (9, T)):
      if start in (0, 6):   # prefills; the one at 6 holds the reset at 7
        y, cache = prefill(layer, x[:, start:stop], cache, reset[:, start:stop])
        outs += list(np.moveaxis(np.asarray(y), 1, 0))
      else:
        for t in range(start, stop):
          y, cache = step(layer, x[:, t], cache, reset[:, t])
          outs.append(np.asarray(y))
    return np.stack(outs, 1)

  # Clean input first: every output equals the call's (steps with a full window included).
  np.testing.assert_allclose(decode(x), forward(layer, x), rtol=1e-4, atol=1e-5)
  ref, got = np.asarray(forward(layer, bad)), decode(bad)
  np.testing.assert_array_equal(np.isnan(got).any(-1), np.isnan(ref).any(-1))
  assert np.isnan(ref[:, BAD_FIRST_DOC]).all() and np.isnan(ref[:, BAD_LAST]).all()
  clean = ~np.isnan(ref).any(-1)
  np.testing.assert_allclose(got[clean], ref[clean], rtol=1e-4, atol=1e-5)


# The layers confine a non-finite x themselves and call the ops with confine_nonfinite=False; on
# finite inputs that must be the same function, forward and gradient, on every path it changes.
@pytest.mark.parametrize("variant", [{}, {"decay": "channel", "combine": "gated"},
                                     {"memory": "delta"}])
# Without a state the unconfined path runs the memory's engine on the last T - W steps only:
# T = W, W + 1, and a window of the engine's chunk length (64) with T not a multiple of it, with
# resets before, at and after W, and (with_state) a first call of 90 > W tokens returning its
# state.
@pytest.mark.parametrize("with_state,window,time", [
    (False, 4, 13), (True, 4, 13), (False, 4, 4), (False, 4, 5), (False, 64, 150),
    (True, 64, 150)])
def test_unconfined_attention_compress_is_the_same_function(variant, with_state, window, time):
  from oracles import D_MODEL, random_params, random_x
  params = random_params(31, window=window, **variant)
  x = random_x(32, (B, time, D_MODEL))
  reset = jnp.zeros((B, time), bool).at[1, min(6, time - 1)].set(True)
  if time > 100:
    reset = reset.at[0, window].set(True).at[1, 100].set(True)
  split = 5 if time < 64 else 90

  def run(params, x, confine):
    weights = dca_jax.compute_weights(params, x)
    if not with_state:
      return dca_jax.attention_compress(weights, window=window, reset=reset,
                                        confine_nonfinite=confine)
    first, state = dca_jax.attention_compress(
        dca_jax.DCAWeights(*(None if w is None else w[:, :split] for w in weights)),
        window=window, reset=reset[:, :split], return_state=True, confine_nonfinite=confine)
    rest = dca_jax.attention_compress(
        dca_jax.DCAWeights(*(None if w is None else w[:, split:] for w in weights)),
        window=window, reset=reset[:, split:], state=state, confine_nonfinite=confine)
    return jnp.concatenate([first, rest], axis=1)

  loss = lambda params, x, confine: jnp.sum(jnp.sin(run(params, x, confine)))
  both = jax.jit(lambda params, x: [(run(params, x, c), jax.grad(loss, (0, 1))(params, x, c))
                                    for c in (True, False)])
  (out, grads), (out_u, grads_u) = both(params, x)
  np.testing.assert_allclose(out_u, out, rtol=1e-6, atol=1e-6)
  # float32 rounding of two orders of the same sums: at T = 150 the delta memory's gradients
  # differ by up to 3.4e-5 relative (measured before the engine skipped the first W steps too).
  rtol, atol = (1e-5, 1e-6) if time < 64 else (1e-4, 1e-5)
  for a, b in zip(jax.tree.leaves(grads_u), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("op", ["window", "blocked"])
def test_unconfined_window_and_blocked_softmax_are_the_same_function(op):
  q, k, v, _, reset = _inputs(3)
  doc = dca_jax.document_ids(reset)

  def run(q, k, v, confine):
    if op == "window":
      return dca_jax.sliding_window_attention(q, k, v, window=5, reset=reset,
                                              confine_nonfinite=confine)
    return dca_jax.blocked_causal_attention(q, k, v, scale=0.5, doc=doc, block=4,
                                            confine_nonfinite=confine)

  loss = lambda q, k, v, confine: jnp.sum(jnp.sin(run(q, k, v, confine)))
  got = jax.jit(lambda *a: (run(*a, False), jax.grad(loss, (0, 1, 2))(*a, False)))(q, k, v)
  want = jax.jit(lambda *a: (run(*a, True), jax.grad(loss, (0, 1, 2))(*a, True)))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("value", [1, "yes", None, jnp.array(True)])
def test_confine_nonfinite_must_be_a_python_bool(value):
  q, k, v, _, _ = _inputs()
  weights = dca_jax.compute_weights(
      dca_jax.init_params(jax.random.key(0), 8, 2, window=4), jnp.zeros((B, T, 8)))
  calls = [lambda: dca_jax.sliding_window_attention(q, k, v, window=3, confine_nonfinite=value),
           lambda: dca_jax.blocked_causal_attention(q, k, v, scale=0.5, confine_nonfinite=value),
           lambda: dca_jax.attention_compress(weights, window=4, confine_nonfinite=value),
           lambda: dca_jax.sliding_window_attention(q[:, :0], k[:, :0], v[:, :0], window=3,
                                                    confine_nonfinite=value)]   # T = 0 too
  for call in calls:
    with pytest.raises(TypeError, match="confine_nonfinite must be a Python bool"):
      call()


def test_unconfined_dca_layer_is_the_same_function_at_user_size():
  """The layers' unconfined path at the size of the benchmarks (H = 4, K = 64, W = 64, T = 200,
  per-head memory chunks): the DCA layer's output and gradients equal those of the same layer
  with its op's confinement forced back on (experiments.confine_check's wrapper)."""
  from experiments import confine_check
  layer = layer_spec("dca").build(256, 4, {"window": 64}, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(5), (2, 200, 256))
  reset = jnp.zeros((2, 200), bool).at[1, 130].set(True)

  def step():
    def loss(state, x):
      y = nnx.merge(graphdef, state)(x, reset=reset)
      return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(state, x)

  got = step()
  with confine_check.confined("dca"):
    jax.clear_caches()
    want = step()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
