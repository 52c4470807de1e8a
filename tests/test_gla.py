"""Tests for `dca_jax.ops.gated_linear_attention`: every form against a float64 oracle and each other.

The recurrence under test, per batch row and head (B batch, T time, H heads, K key dim, V value
dim):

    S_t = diag(exp(log_decay_t)) S_{t-1} + k_t v_t^T,    o_t = S_t^T q_t,    S_0 = initial state,

with the carried state dropped where `reset[b, t]` is true. Two references, not taken from the
library, are in `oracles`: a plain float64 NumPy loop (`oracles.gla`, forward) and a float64
`lax.scan` (`oracles.gla_dense`, forward and, by autodiff, gradients). The library's float64
inputs are cast to float32 inside the op, so its own forms cannot serve as a float64 reference.

Compilation dominates the cost of these tests on CPU (every drawn shape compiles anew), so every
jitted call goes through `oracles.fast_jit`, which asks XLA:CPU for a cheap compile (no LLVM
optimisation, classic fusion emitters): about ten times faster to compile, same arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracles
from dca_jax.ops import Mode, combine_decayed_states, gated_linear_attention
from oracles import fast_jit

MODES = ("recurrent", "associative", "chunked", "quadratic", "auto")
CHUNK_SIZES = (1, 2, 3, 7, 8, 16, 20, 64)
# Awkward lengths: 1, primes, shorter than most chunks, not multiples of any chunk.
AWKWARD_T = (1, 2, 3, 5, 7, 11, 13, 17, 31, 37, 61, 67)

# Float32 forms against the float64 references, relative to the magnitude of the reference.
F32_TOL = 1e-4
F32_GRAD_TOL = 2e-4

def _settings(examples):
  return settings(max_examples=oracles.draws(examples), deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Random problems.


@dataclasses.dataclass(frozen=True)
class Problem:
  """Shapes, options and a seed; `arrays()` draws fresh random inputs from them."""

  batch: int
  time: int
  heads: int
  key_dim: int
  value_dim: int
  per_channel: bool
  with_reset: bool
  with_state: bool
  decay_scale: float
  seed: int
  extreme: bool = False

  def arrays(self):
    """Returns dict(q, k, v, log_decay, initial_state, reset) as float32 / bool NumPy arrays."""
    rng = np.random.default_rng(self.seed)
    b, t, h, kd, vd = self.batch, self.time, self.heads, self.key_dim, self.value_dim
    decay_shape = (b, t, h, kd) if self.per_channel else (b, t, h)
    if self.extreme:
      # Exact zeros, -1e4, -inf and ordinary values, mixed at random positions in random
      # proportions (some draws are all -inf or all 0).
      choices = np.array([0.0, -1e4, -np.inf, np.nan])
      kind = rng.choice(4, size=decay_shape, p=rng.dirichlet(np.full(4, 0.5)))
      log_decay = np.where(kind == 3, -rng.exponential(0.5, decay_shape), choices[kind])
    else:
      log_decay = -rng.exponential(self.decay_scale, decay_shape)
    reset = None
    if self.with_reset:
      reset = rng.random((b, t)) < rng.choice([0.05, 0.2, 0.5])
    initial_state = rng.normal(size=(b, h, kd, vd)).astype(np.float32) if self.with_state else None
    return dict(
        q=rng.normal(size=(b, t, h, kd)).astype(np.float32),
        k=rng.normal(size=(b, t, h, kd)).astype(np.float32),
        v=rng.normal(size=(b, t, h, vd)).astype(np.float32),
        log_decay=log_decay.astype(np.float32),
        initial_state=initial_state,
        reset=reset,
    )

  def loss_weights(self):
    """Random weights for the loss sum(sin(o) * w_o) + sum(S_T * w_s)."""
    rng = np.random.default_rng(self.seed + 1)
    w_o = rng.normal(size=(self.batch, self.time, self.heads, self.value_dim)).astype(np.float32)
    w_s = rng.normal(size=(self.batch, self.heads, self.key_dim, self.value_dim)).astype(np.float32)
    return w_o, w_s


@st.composite
def problems(draw, *, min_time=1, max_time=70, reset=None, state=None, per_channel=None,
             extreme=False):
  """Random shapes (awkward lengths favoured) and options; None means "drawn"."""
  time = draw(st.one_of(st.sampled_from([t for t in AWKWARD_T if min_time <= t <= max_time]),
                        st.integers(min_time, max_time)))
  pick = lambda fixed: draw(st.booleans()) if fixed is None else fixed
  return Problem(
      batch=draw(st.integers(1, 2)),
      time=time,
      heads=draw(st.integers(1, 3)),
      key_dim=draw(st.integers(1, 9)),
      value_dim=draw(st.integers(1, 9)),
      per_channel=pick(per_channel),
      with_reset=pick(reset),
      with_state=pick(state),
      decay_scale=draw(st.sampled_from([0.01, 0.3, 3.0])),
      seed=draw(st.integers(0, 2**31 - 1)),
      extreme=extreme,
  )


chunk_sizes = st.sampled_from(CHUNK_SIZES)


# The library's forms and the float64 reference, with gradients of a loss.


def _loss(forward, q, k, v, log_decay, initial_state, reset, w_o, w_s):
  """A non-linear scalar of the outputs and the final state, and both as auxiliary outputs."""
  o, final = forward(q, k, v, log_decay, initial_state, reset)
  return jnp.sum(jnp.sin(o) * w_o) + jnp.sum(final * w_s), (o, final)


def _value_and_grads(forward, q, k, v, log_decay, initial_state, reset, w_o, w_s):
  """(o, S_T, grads wrt q, k, v, log_decay[, initial_state]) of `_loss`."""
  argnums = (0, 1, 2, 3) if initial_state is None else (0, 1, 2, 3, 4)
  loss = functools.partial(_loss, forward)
  (_, (o, final)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
      q, k, v, log_decay, initial_state, reset, w_o, w_s)
  return o, final, grads


@functools.lru_cache(maxsize=None)
def _reference_runner():
  return fast_jit(functools.partial(_value_and_grads, oracles.gla_dense))


def _reference(problem, arrays):
  """Float64 (o, S_T, grads) of the JAX reference, as NumPy float64 arrays."""
  w_o, w_s = problem.loss_weights()
  with jax.enable_x64(True):
    as64 = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
    reset = None if arrays["reset"] is None else jnp.asarray(arrays["reset"])
    out = _reference_runner()(*(as64(arrays[n]) for n in ("q", "k", "v", "log_decay", "initial_state")),
                              reset, as64(w_o), as64(w_s))
    return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def _library_forward(mode, chunk_size):
  def forward(q, k, v, log_decay, initial_state, reset):
    return gated_linear_attention(q, k, v, log_decay, initial_state=initial_state, reset=reset,
                                  mode=mode, chunk_size=chunk_size, return_final_state=True)
  return forward


@functools.lru_cache(maxsize=None)
def _modes_runner(configs, with_grads):
  """One jitted function evaluating every (mode, chunk_size) in `configs` on the same inputs.

  Compiling the forms together costs less than compiling them one by one.
  """
  def run(q, k, v, log_decay, initial_state, reset, w_o, w_s):
    results = []
    for mode, chunk_size in configs:
      forward = _library_forward(mode, chunk_size)
      if with_grads:
        results.append(_value_and_grads(forward, q, k, v, log_decay, initial_state, reset, w_o, w_s))
      else:
        results.append(forward(q, k, v, log_decay, initial_state, reset))
    return results
  return fast_jit(run)


def _run_modes(configs, problem, arrays, with_grads=False):
  """{(mode, chunk_size): (o, S_T[, grads])} as NumPy arrays, for float32 inputs."""
  w_o, w_s = problem.loss_weights()
  configs = tuple(configs)
  out = _modes_runner(configs, with_grads)(
      arrays["q"], arrays["k"], arrays["v"], arrays["log_decay"], arrays["initial_state"],
      arrays["reset"], w_o, w_s)
  return {config: jax.tree.map(np.asarray, result) for config, result in zip(configs, out)}


def _assert_close(actual, expected, tol, what):
  """|actual - expected| <= tol * (|expected| + max|expected| + 1), elementwise; all finite."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values {actual[~np.isfinite(actual)][:5]}"
  scale = 1.0 + (np.max(np.abs(expected)) if expected.size else 0.0)
  chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol * scale, custom_message=what)


# Every form against the references.


def _check_against_references(problem, chunk_size, grad_tol=F32_GRAD_TOL):
  arrays = problem.arrays()
  oracle_o, oracle_s = oracles.gla(**arrays)
  ref_o, ref_s, ref_grads = _reference(problem, arrays)
  # The two references agree to float64 precision.
  _assert_close(ref_o, oracle_o, 1e-10, "jax float64 reference vs NumPy oracle, o")
  _assert_close(ref_s, oracle_s, 1e-10, "jax float64 reference vs NumPy oracle, S_T")
  configs = [(mode, chunk_size) for mode in MODES]
  results = _run_modes(configs, problem, arrays, with_grads=True)
  names = ("q", "k", "v", "log_decay", "initial_state")
  for (mode, chunk), (o, final, grads) in results.items():
    where = f"mode={mode}, chunk_size={chunk}"
    assert o.dtype == np.float32 and final.dtype == np.float32
    _assert_close(o, oracle_o, F32_TOL, f"{where}: o")
    _assert_close(final, oracle_s, F32_TOL, f"{where}: final state")
    assert len(grads) == len(ref_grads)
    for name, grad, ref in zip(names, grads, ref_grads):
      _assert_close(grad, ref, grad_tol, f"{where}: d loss / d {name}")


@_settings(15)
@given(problem=problems(), chunk_size=chunk_sizes)
def test_every_mode_matches_float64_references_forward_and_gradients(problem, chunk_size):
  """o and S_T vs the NumPy oracle; grads wrt q, k, v, log_decay, initial_state vs float64 autodiff."""
  _check_against_references(problem, chunk_size)


@_settings(10)
@given(problem=problems(extreme=True), chunk_size=chunk_sizes)
def test_extreme_decays_are_finite_and_exact(problem, chunk_size):
  """log_decay with 0, -1e4 and -inf mixed in: finite outputs and gradients, equal to the oracle."""
  _check_against_references(problem, chunk_size)


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_extreme_decays_all_inf_all_zero(per_channel):
  """Degenerate decays everywhere: all -inf (no memory), all 0 (no forgetting), all -1e4."""
  base = Problem(2, 37, 2, 3, 4, per_channel, with_reset=True, with_state=True, decay_scale=1.0,
                 seed=7)
  for value in (-np.inf, 0.0, -1e4):
    arrays = base.arrays()
    arrays["log_decay"] = np.full_like(arrays["log_decay"], value)
    oracle_o, oracle_s = oracles.gla(**arrays)
    for (mode, chunk), (o, final) in _run_modes([(m, 8) for m in MODES], base, arrays).items():
      _assert_close(o, oracle_o, F32_TOL, f"log_decay={value}, mode={mode}: o")
      _assert_close(final, oracle_s, F32_TOL, f"log_decay={value}, mode={mode}: final state")


# Every form against every other.


@_settings(12)
@given(problem=problems(), chunks=st.lists(chunk_sizes, min_size=2, max_size=2, unique=True))
def test_modes_agree_pairwise(problem, chunks):
  arrays = problem.arrays()
  configs = [(m, None) for m in MODES if m != "chunked"] + [("chunked", c) for c in chunks]
  results = _run_modes(configs, problem, arrays)
  for (a, (o_a, s_a)), (b, (o_b, s_b)) in itertools.combinations(results.items(), 2):
    _assert_close(o_a, o_b, F32_TOL, f"o: {a} vs {b}")
    _assert_close(s_a, s_b, F32_TOL, f"final state: {a} vs {b}")


# The associative combine.


def _random_segment(rng, per_channel, shape=(2, 3), key_dim=4, value_dim=5):
  """(a, U) with a in [0, 1] (some exact 0 and 1) of shape [..., D, 1] and U [..., K, V]."""
  d = key_dim if per_channel else 1
  a = rng.uniform(0, 1, size=shape + (d, 1))
  a = np.where(rng.random(a.shape) < 0.1, 0.0, np.where(rng.random(a.shape) < 0.1, 1.0, a))
  u = rng.normal(size=shape + (key_dim, value_dim))
  return a.astype(np.float32), u.astype(np.float32)


@_settings(20)
@given(seed=st.integers(0, 2**31 - 1), per_channel=st.booleans())
def test_combine_decayed_states_is_associative(seed, per_channel):
  rng = np.random.default_rng(seed)
  x, y, z = (_random_segment(rng, per_channel) for _ in range(3))
  left = combine_decayed_states(combine_decayed_states(x, y), z)
  right = combine_decayed_states(x, combine_decayed_states(y, z))
  chex.assert_trees_all_close(left, right, rtol=1e-6, atol=1e-6)


@_settings(20)
@given(seed=st.integers(0, 2**31 - 1), per_channel=st.booleans())
def test_combine_decayed_states_equals_applying_segments_in_sequence(seed, per_channel):
  rng = np.random.default_rng(seed)
  (a1, u1), (a2, u2) = _random_segment(rng, per_channel), _random_segment(rng, per_channel)
  state = rng.normal(size=u1.shape)
  in_sequence = a2 * (a1 * state + u1) + u2
  a, u = combine_decayed_states((a1, u1), (a2, u2))
  assert a.shape == a1.shape and u.shape == u1.shape
  chex.assert_trees_all_close(np.asarray(a) * state + np.asarray(u), in_sequence, rtol=1e-5, atol=1e-5)


# Chaining, resets, per-head decays.


def _slice_time(arrays, start, stop):
  out = dict(arrays)
  for name in ("q", "k", "v", "log_decay"):
    out[name] = arrays[name][:, start:stop]
  if arrays["reset"] is not None:
    out["reset"] = arrays["reset"][:, start:stop]
  return out


@functools.lru_cache(maxsize=None)
def _chained_runner(configs, split):
  """Per (mode, chunk_size): the whole run, and [0, split) then [split, T) from the carried state."""
  def run(q, k, v, log_decay, initial_state, reset):
    part = lambda x, start, stop: None if x is None else x[:, start:stop]
    results = []
    for mode, chunk_size in configs:
      forward = _library_forward(mode, chunk_size)
      whole = forward(q, k, v, log_decay, initial_state, reset)
      head_o, head_s = forward(*(part(x, 0, split) for x in (q, k, v, log_decay)), initial_state,
                               part(reset, 0, split))
      tail_o, tail_s = forward(*(part(x, split, None) for x in (q, k, v, log_decay)), head_s,
                               part(reset, split, None))
      results.append((whole, (jnp.concatenate([head_o, tail_o], axis=1), tail_s)))
    return results
  return fast_jit(run)


@_settings(8)
@given(problem=problems(min_time=2), chunk_size=chunk_sizes, data=st.data())
def test_chaining_equals_whole_run(problem, chunk_size, data):
  """[0, T1) then [T1, T) from the carried state equals the whole run, in every mode."""
  split = data.draw(st.integers(1, problem.time - 1), label="split")
  arrays = problem.arrays()
  configs = tuple((mode, chunk_size) for mode in MODES)
  results = _chained_runner(configs, split)(
      *(arrays[n] for n in ("q", "k", "v", "log_decay", "initial_state", "reset")))
  for config, ((whole_o, whole_s), (chained_o, chained_s)) in zip(configs, results):
    _assert_close(chained_o, whole_o, F32_TOL, f"{config}: chained o")
    _assert_close(chained_s, whole_s, F32_TOL, f"{config}: chained final state")


@_settings(10)
@given(problem=problems(reset=True, state=True), chunk_size=chunk_sizes, data=st.data())
def test_reset_equals_separate_documents(problem, chunk_size, data):
  """With resets, each document is computed as if alone, from a zero state; the initial state
  only feeds the part of a row before its first reset."""
  arrays = problem.arrays()
  # At most three resets per row, one of them possibly at t = 0.
  positions = data.draw(st.lists(st.lists(st.integers(0, problem.time - 1), max_size=3),
                                 min_size=problem.batch, max_size=problem.batch), label="resets")
  reset = np.zeros((problem.batch, problem.time), bool)
  for row, starts in enumerate(positions):
    reset[row, starts] = True
  arrays["reset"] = reset
  configs = [(mode, chunk_size) for mode in MODES]
  results = _run_modes(configs, problem, arrays)

  # Separate runs, one per document, with the recurrent form (checked against the other forms
  # without resets elsewhere): zero state for a document that starts at a reset.
  expected_o = np.zeros((problem.batch, problem.time, problem.heads, problem.value_dim))
  expected_s = np.zeros((problem.batch, problem.heads, problem.key_dim, problem.value_dim))
  for row in range(problem.batch):
    bounds = sorted(set([0] + list(np.flatnonzero(reset[row])) + [problem.time]))
    for start, stop in zip(bounds[:-1], bounds[1:]):
      doc = {name: None if x is None else x[row:row + 1] for name, x in arrays.items()}
      doc = _slice_time(doc, start, stop)
      doc["reset"] = None
      if reset[row, start]:
        doc["initial_state"] = None
      doc_problem = dataclasses.replace(problem, batch=1, time=stop - start)
      doc_o, doc_s = _run_modes([("recurrent", None)], doc_problem, doc)[("recurrent", None)]
      expected_o[row, start:stop] = doc_o[0]
      expected_s[row] = doc_s[0]
  for config, (o, final) in results.items():
    _assert_close(o, expected_o, F32_TOL, f"{config}: o with resets vs separate documents")
    _assert_close(final, expected_s, F32_TOL, f"{config}: final state with resets")

  # From the first reset on, the initial state makes no difference.
  other = dict(arrays, initial_state=arrays["initial_state"] * -3.0 + 1.0)
  other_results = _run_modes(configs, problem, other)
  for config, (o, final) in results.items():
    o_other, final_other = other_results[config]
    for row in range(problem.batch):
      if reset[row].any():
        first = int(np.argmax(reset[row]))
        np.testing.assert_array_equal(o[row, first:], o_other[row, first:], err_msg=str(config))
        np.testing.assert_array_equal(final[row], final_other[row], err_msg=str(config))


@_settings(8)
@given(problem=problems(per_channel=False), chunk_size=chunk_sizes)
def test_per_head_decay_equals_broadcast_per_channel(problem, chunk_size):
  """A [B, T, H] log decay acts like the [B, T, H, K] one with the same value on every channel.

  (Gradients of both layouts are checked against the float64 reference in the tests above.)
  """
  arrays = problem.arrays()
  wide = dict(arrays, log_decay=np.repeat(arrays["log_decay"][..., None], problem.key_dim, -1))
  configs = [(mode, chunk_size) for mode in MODES]
  per_head = _run_modes(configs, problem, arrays)
  per_channel = _run_modes(configs, dataclasses.replace(problem, per_channel=True), wide)
  for config in configs:
    (o_h, s_h), (o_c, s_c) = per_head[config], per_channel[config]
    _assert_close(o_h, o_c, F32_TOL, f"{config}: o")
    _assert_close(s_h, s_c, F32_TOL, f"{config}: final state")


# Long sequences.


@pytest.mark.parametrize("decays", ["per_head_slow", "per_channel_slow", "per_channel_strong"])
def test_long_sequence_chunked_matches_recurrent(decays):
  """T = 2**16: no overflow of accumulated decays; chunked equals the token-by-token scan."""
  batch, time, heads, dim = 1, 2**16, 1, 4
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(batch, time, heads, dim)).astype(np.float32) for _ in range(3))
  if decays == "per_head_slow":
    log_decay = np.full((batch, time, heads), -1e-4, np.float32)
  elif decays == "per_channel_slow":
    log_decay = np.full((batch, time, heads, dim), -1e-4, np.float32)
  else:
    # Strong decays (hundreds of nats per chunk) with occasional near-1 channels and -inf.
    log_decay = -rng.exponential(3.0, (batch, time, heads, dim)).astype(np.float32)
    log_decay[..., 0] *= 1e-3
    log_decay[rng.random(log_decay.shape) < 1e-3] = -np.inf
  s0 = rng.normal(size=(batch, heads, dim, dim)).astype(np.float32)

  def run(mode):
    fn = functools.partial(gated_linear_attention, mode=mode, chunk_size=64, return_final_state=True)
    return fast_jit(fn)(q, k, v, log_decay, initial_state=s0)

  o_chunked, s_chunked = run("chunked")
  o_recurrent, s_recurrent = run("recurrent")
  assert np.all(np.isfinite(o_chunked)) and np.all(np.isfinite(s_chunked))
  _assert_close(o_chunked, o_recurrent, F32_TOL, "o")
  _assert_close(s_chunked, s_recurrent, F32_TOL, "final state")


# Dtypes.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_low_precision_inputs(dtype):
  """Output in the input dtype, final state float32, close to float32 on the same rounded inputs."""
  problem = Problem(2, 29, 2, 5, 3, per_channel=True, with_reset=True, with_state=True,
                    decay_scale=0.3, seed=3)
  arrays = problem.arrays()
  low = {n: x if n == "reset" else jnp.asarray(x, dtype) for n, x in arrays.items()}
  exact = {n: x if n == "reset" else np.asarray(low[n], np.float32) for n, x in arrays.items()}
  configs = [(mode, 8) for mode in MODES]
  out_low = _run_modes(configs, problem, low)
  out_f32 = _run_modes(configs, problem, exact)
  for config in configs:
    o, final = out_low[config]
    assert o.dtype == dtype, config
    assert final.dtype == np.float32, config
    _assert_close(o.astype(np.float32), out_f32[config][0], 2e-2, f"{config}: o")
    _assert_close(final, out_f32[config][1], 1e-5, f"{config}: final state")


def test_float64_inputs_return_float64_outputs():
  """Outputs come back in the input dtype also for float64 (the computation itself is float32)."""
  problem = Problem(1, 9, 1, 3, 2, True, False, True, 0.3, seed=4)
  arrays = problem.arrays()
  oracle_o, _ = oracles.gla(**arrays)
  with jax.enable_x64(True):
    as64 = {n: None if x is None else np.asarray(x, np.float64) for n, x in arrays.items()}
    o, final = gated_linear_attention(as64["q"], as64["k"], as64["v"], as64["log_decay"],
                                      initial_state=as64["initial_state"], mode="recurrent",
                                      return_final_state=True)
    assert o.dtype == jnp.float64
    assert final.dtype == jnp.float32
  _assert_close(o, oracle_o, F32_TOL, "o")


# Transformations.


def _small_problem(seed=0, **kwargs):
  fields = dict(batch=2, time=11, heads=2, key_dim=3, value_dim=4, per_channel=True,
                with_reset=True, with_state=True, decay_scale=0.3, seed=seed)
  fields.update(kwargs)
  return Problem(**fields)


@pytest.mark.parametrize("mode", ["recurrent", "chunked"])
def test_jit_equals_eager(mode):
  arrays = _small_problem(seed=1).arrays()
  fn = functools.partial(gated_linear_attention, mode=mode, chunk_size=4, return_final_state=True)
  args = (arrays["q"], arrays["k"], arrays["v"], arrays["log_decay"])
  kwargs = dict(initial_state=arrays["initial_state"], reset=arrays["reset"])
  chex.assert_trees_all_close(jax.jit(fn)(*args, **kwargs), fn(*args, **kwargs), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_vmap_equals_stacked_items_forward_and_grad(mode):
  """vmap over a leading axis of problems, of the forward and of jax.grad, equals item by item."""
  items = [_small_problem(seed=s).arrays() for s in range(3)]
  names = ("q", "k", "v", "log_decay", "initial_state", "reset")
  stacked = [np.stack([item[n] for item in items]) for n in names]

  def loss(q, k, v, log_decay, initial_state, reset):
    o, final = gated_linear_attention(q, k, v, log_decay, initial_state=initial_state, reset=reset,
                                      mode=mode, chunk_size=4, return_final_state=True)
    return jnp.sum(jnp.sin(o)) + jnp.sum(final ** 2), (o, final)

  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
  batched = fast_jit(jax.vmap(value_and_grad))(*stacked)
  single = fast_jit(value_and_grad)
  per_item = [single(*(item[n] for n in names)) for item in items]
  expected = jax.tree.map(lambda *xs: np.stack(xs), *per_item)
  chex.assert_trees_all_close(batched, expected, rtol=1e-5, atol=1e-5)


def test_traces_once_for_inputs_of_one_shape():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(q, k, v, log_decay, initial_state):
    return gated_linear_attention(q, k, v, log_decay, initial_state=initial_state, mode="chunked",
                                  chunk_size=4, return_final_state=True)

  try:
    for seed in range(3):
      arrays = _small_problem(seed=seed, with_reset=False).arrays()
      o, final = step(arrays["q"], arrays["k"], arrays["v"], arrays["log_decay"],
                      arrays["initial_state"])
      assert np.all(np.isfinite(o)) and np.all(np.isfinite(final))
  finally:
    chex.clear_trace_counter()


# Bad inputs.


def _good_inputs(**changes):
  rng = np.random.default_rng(0)
  b, t, h, kd, vd = 2, 5, 3, 4, 6
  args = dict(
      q=rng.normal(size=(b, t, h, kd)).astype(np.float32),
      k=rng.normal(size=(b, t, h, kd)).astype(np.float32),
      v=rng.normal(size=(b, t, h, vd)).astype(np.float32),
      log_decay=-rng.random((b, t, h, kd)).astype(np.float32),
  )
  args.update(changes)
  return args


def _arr(*shape, dtype=np.float32, value=-0.5):
  return np.full(shape, value, dtype)


def _with(x, index, value):
  x = x.copy()
  x[index] = value
  return x


# (what, changed arguments, keyword arguments, exception, pattern the message must contain)
BAD_INPUTS = [
    ("q rank 3", dict(q=_arr(2, 5, 12)), {}, ValueError, "q"),
    ("q rank 5", dict(q=_arr(2, 5, 3, 4, 1)), {}, ValueError, "q"),
    ("k rank", dict(k=_arr(2, 5, 12)), {}, ValueError, "k"),
    ("v rank", dict(v=_arr(2, 5, 3)), {}, ValueError, "v"),
    ("log_decay rank 2", dict(log_decay=_arr(2, 5)), {}, ValueError, "log_decay"),
    ("log_decay rank 5", dict(log_decay=_arr(2, 5, 3, 4, 1)), {}, ValueError, "log_decay"),
    ("k batch", dict(k=_arr(1, 5, 3, 4)), {}, ValueError, "k"),
    ("v batch", dict(v=_arr(1, 5, 3, 6)), {}, ValueError, "v"),
    ("log_decay batch", dict(log_decay=_arr(1, 5, 3, 4)), {}, ValueError, "log_decay"),
    ("k time", dict(k=_arr(2, 4, 3, 4)), {}, ValueError, "k"),
    ("v time", dict(v=_arr(2, 6, 3, 6)), {}, ValueError, "v"),
    ("log_decay time", dict(log_decay=_arr(2, 4, 3)), {}, ValueError, "log_decay"),
    ("k heads", dict(k=_arr(2, 5, 2, 4)), {}, ValueError, "k"),
    ("v heads", dict(v=_arr(2, 5, 1, 6)), {}, ValueError, "v"),
    ("log_decay heads", dict(log_decay=_arr(2, 5, 2, 4)), {}, ValueError, "log_decay"),
    ("k key dim", dict(k=_arr(2, 5, 3, 5)), {}, ValueError, "k"),
    ("log_decay key dim", dict(log_decay=_arr(2, 5, 3, 5)), {}, ValueError, "log_decay"),
    ("positive log_decay", dict(log_decay=_arr(2, 5, 3, 4, value=0.1)), {}, ValueError, "log_decay"),
    ("one positive log_decay", dict(log_decay=_with(_arr(2, 5, 3), (1, 2, 0), 1e-3)), {}, ValueError,
     "log_decay"),
    ("positive bfloat16 log_decay", dict(log_decay=jnp.full((2, 5, 3), 0.25, jnp.bfloat16)), {},
     ValueError, "log_decay"),
    ("NaN log_decay", dict(log_decay=_with(_arr(2, 5, 3, 4), (0, 4, 2, 1), np.nan)), {}, ValueError,
     "log_decay"),
    ("integer q", dict(q=_arr(2, 5, 3, 4, dtype=np.int32, value=1)), {}, TypeError, "q"),
    ("q not an array", dict(q=[[1.0]]), {}, TypeError, "q"),
    ("unknown mode", {}, dict(mode="fast"), ValueError, "mode"),
    ("chunk_size 0", {}, dict(mode="chunked", chunk_size=0), ValueError, "chunk_size"),
    ("chunk_size < 0", {}, dict(mode="chunked", chunk_size=-4), ValueError, "chunk_size"),
    ("chunk_size float", {}, dict(mode="chunked", chunk_size=4.0), (ValueError, TypeError), "chunk_size"),
    ("chunk_size bool", {}, dict(mode="chunked", chunk_size=True), (ValueError, TypeError), "chunk_size"),
    ("initial_state shape", {}, dict(initial_state=_arr(2, 3, 4, 4)), ValueError, "initial_state"),
    ("initial_state rank", {}, dict(initial_state=_arr(2, 3, 24)), ValueError, "initial_state"),
    ("reset shape", {}, dict(reset=np.zeros((2, 4), bool)), ValueError, "reset"),
    ("reset rank", {}, dict(reset=np.zeros((2, 5, 1), bool)), ValueError, "reset"),
    ("reset dtype", {}, dict(reset=np.zeros((2, 5), np.int32)), TypeError, "reset"),
    ("reset float", {}, dict(reset=np.zeros((2, 5), np.float32)), TypeError, "reset"),
    ("T = 0", dict(q=_arr(2, 0, 3, 4), k=_arr(2, 0, 3, 4), v=_arr(2, 0, 3, 6),
                   log_decay=_arr(2, 0, 3, 4)), {}, ValueError, "T"),
]


@pytest.mark.parametrize("what, changes, kwargs, error, pattern", BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(what, changes, kwargs, error, pattern):
  del what
  args = _good_inputs(**changes)
  # The message names the argument as a word (so "q" is not found inside "requires").
  with pytest.raises(error, match=rf"\b{pattern}\b"):
    gated_linear_attention(args["q"], args["k"], args["v"], args["log_decay"], **kwargs)


def test_good_inputs_pass_the_checks():
  """The baseline of BAD_INPUTS is valid, so each case fails for its one change only."""
  args = _good_inputs()
  o = gated_linear_attention(args["q"], args["k"], args["v"], args["log_decay"], mode="recurrent",
                             initial_state=_arr(2, 3, 4, 6), reset=np.zeros((2, 5), bool))
  assert o.shape == (2, 5, 3, 6)


def test_mode_accepts_the_enum():
  args = _good_inputs()
  by_enum = gated_linear_attention(*args.values(), mode=Mode.RECURRENT)
  by_name = gated_linear_attention(*args.values(), mode="recurrent")
  np.testing.assert_array_equal(by_enum, by_name)


# The planner's "auto" form under every kind of autodiff.

@pytest.mark.parametrize("time", [5, 200])      # quadratic and chunked gradient plans on CPU
def test_auto_mode_forward_and_reverse_mode_equal_the_recurrent_form(time):
  keys = jax.random.split(jax.random.key(time), 5)
  q, k = (jax.random.normal(keys[i], (1, time, 2, 4)) for i in range(2))
  v = jax.random.normal(keys[2], (1, time, 2, 3))
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (1, time, 2)) + 2.0)
  tangent = jax.random.normal(keys[4], q.shape)
  f = {mode: jax.jit(lambda q, mode=mode: jnp.sum(gated_linear_attention(q, k, v, g, mode=mode) ** 2))
       for mode in ("auto", "recurrent")}
  (_, jvp_auto), (_, jvp_ref) = (jax.jvp(f[m], (q,), (tangent,)) for m in ("auto", "recurrent"))
  np.testing.assert_allclose(jvp_auto, jvp_ref, rtol=1e-4)
  np.testing.assert_allclose(jax.grad(f["auto"])(q), jax.grad(f["recurrent"])(q), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(jax.jacfwd(f["auto"])(q), jax.grad(f["recurrent"])(q), rtol=1e-4,
                             atol=1e-5)


def test_head_decay_weights_equal_float64_direct_sums_forward_and_gradient():
  """The chunked form's per-head decay weights (one masked matmul) against float64 direct sums,
  with 0, -1e4, -1e31 (below the clamp) and -inf log decays mixed in; the gradient against the
  float64 one, finite."""
  from dca_jax.ops.quadratic import head_decay_weights  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(3)
  g = -rng.exponential(0.3, size=(3, 64))
  g[0, 5], g[0, 40], g[1, 0], g[1, 17], g[2, 30], g[2, 31] = (-np.inf, 0.0, -1e4, -np.inf,
                                                              -1e31, -np.inf)
  i, j = np.arange(64)[:, None], np.arange(64)[None, :]
  between = (j[:, :, None] < np.arange(64)) & (np.arange(64) <= i[:, :, None])   # [i, j, l]

  def direct(x):   # exp of the direct sum over j < l <= i, float64 under enable_x64
    sums = jnp.sum(jnp.where(between, x[..., None, None, :], 0.0), axis=-1)
    return jnp.where(i >= j, jnp.exp(sums), 0.0)

  cot = rng.normal(size=(64, 64))
  loss = lambda f: lambda x: jnp.sum(f(x) * cot)
  g32 = jnp.asarray(g, jnp.float32)
  got, grad = np.asarray(head_decay_weights(g32)), np.asarray(jax.grad(loss(head_decay_weights))(g32))
  with jax.enable_x64(True):
    expected = np.asarray(direct(jnp.asarray(g)))
    grad64 = np.asarray(jax.grad(loss(direct))(jnp.asarray(g)))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert np.array_equal(got == 0, expected == 0)          # exact zeros where a -inf is crossed
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, grad64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("time,chunk,segment,per_channel", [
    (37, 4, 8, False), (70, 8, 12, True), (64, 4, 16, False), (13, 4, 5, True), (9, 8, 64, False),
])
def test_segmented_chunked_pass_equals_float64_scan_forward_and_gradients(time, chunk, segment,
                                                                          per_channel):
  """`chunked.chunked` with `segment_size` (a checkpointed scan over segments, then the rest)
  against the float64 token scan: outputs, final state, and gradients of all five inputs, with
  0, -1e4 and -inf log decays mixed in; segment lengths that are not multiples of the chunk
  (rounded down to one), longer than T, and T not a multiple of them."""
  from dca_jax.ops import chunked as chunked_form  # pylint: disable=import-outside-toplevel
  from dca_jax.ops import scan  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(time + segment)
  heads, dim = 2, 4
  q, k, v = (rng.normal(size=(2, time, heads, dim)) for _ in range(3))
  g = -rng.exponential(0.4, size=(2, time, heads, dim if per_channel else 1))
  g.flat[rng.choice(g.size, 3, replace=False)] = [0.0, -1e4, -np.inf]
  s0 = rng.normal(size=(2, heads, dim, dim))
  w_o, w_s = rng.normal(size=(2, time, heads, dim)), rng.normal(size=s0.shape)

  def loss(form):
    def value(*args):
      o, final = form(*args)
      return jnp.sum(o * w_o) + jnp.sum(final * w_s), (o, final)
    return jax.value_and_grad(value, argnums=(0, 1, 2, 3, 4), has_aux=True)

  segmented = functools.partial(chunked_form.chunked, chunk_size=chunk, segment_size=segment)
  args32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, s0)]
  (_, (o, final)), grads = fast_jit(loss(segmented))(*args32)
  with jax.enable_x64(True):
    (_, (o64, final64)), grads64 = loss(scan.recurrent)(*(jnp.asarray(x) for x in (q, k, v, g, s0)))
    o64, final64, grads64 = jax.tree.map(np.asarray, (o64, final64, grads64))
  _assert_close(o, o64, F32_TOL, "o")
  _assert_close(final, final64, F32_TOL, "final state")
  for name, grad, ref in zip(("q", "k", "v", "log_decay", "initial_state"), grads, grads64):
    _assert_close(grad, ref, F32_GRAD_TOL, f"d loss / d {name}")


@pytest.mark.parametrize("time,chunk,per_channel,argnums", [
    (37, 8, False, (0, 1, 2, 3, 4)), (45, 16, True, (0, 1, 2, 3, 4)), (130, 16, False, (3,)),
    (45, 16, True, (2, 4)), (37, 8, False, (0, 3))])
def test_chunked_pass_gauge_rule_equals_plain_autodiff_in_float64(time, chunk, per_channel,
                                                                  argnums):
  """The chunked pass's JVP rule (the log decays' tangent moved onto q and k, `chunked.
  _gauge_jvp`) against plain autodiff of the same pass, both in float64: gradients of all five
  inputs and a JVP with every tangent, with 0, -1e4 and -inf log decays mixed in (where the
  identity's two sides are 0 exactly, and the rule's rounding residue must stay at float64's).
  Subsets of the inputs differentiated (`argnums`) reach the rule with symbolic-zero tangents;
  T not a multiple of the chunk pads inside the pass."""
  from dca_jax.ops import chunked as chunked_form  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(time)
  heads, dim = 3, 4
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(rng.normal(size=(2, time, heads, dim))) for _ in range(3))
    g = -rng.exponential(0.4, size=(2, time, heads, dim if per_channel else 1))
    g.flat[rng.choice(g.size, 3, replace=False)] = [0.0, -1e4, -np.inf]
    g = jnp.asarray(g)
    s0 = jnp.asarray(rng.normal(size=(2, heads, dim, dim)))
    oracles.assert_jvp_rule_matches_plain(
        chunked_form._chunked_pass, chunked_form._plain_pass,  # pylint: disable=protected-access
        (q, k, v, g, s0), ("q", "k", "v", "log_decay", "initial_state"), argnums, chunk, rng,
        log_decay_index=3)


@pytest.mark.parametrize("per_channel", [False, True])
def test_chunked_pass_gauge_rule_float32_log_decay_gradient_at_t4096(per_channel):
  """The rule's log-decay gradient sums q . dq - k . dk over the whole pass, so its float32
  rounding grows with the pass's length: at T = 4096 (one pass, the longest the CPU planner runs
  below its segments' 8192) and strong decays (about e^-1 per token), against the float64
  gradient, within 1e-4 of the largest entry (`sum(o^2)`: the terms do not cancel by sign)."""
  from dca_jax.ops import chunked as chunked_form  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(4)
  time, heads, dim = 4096, 2, 8
  q, k, v = (rng.normal(size=(1, time, heads, dim)) for _ in range(3))
  g = -1.0 - rng.exponential(0.05, size=(1, time, heads, dim if per_channel else 1))

  def grad_of_log_decay(*arrays):
    zeros = jnp.zeros((1, heads, dim, dim), arrays[0].dtype)
    return jax.grad(lambda *a: jnp.sum(chunked_form._chunked_pass(  # pylint: disable=protected-access
        *a, zeros, chunk_size=64)[0] ** 2), argnums=3)(*arrays)

  ours = fast_jit(grad_of_log_decay)(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, g)))
  with jax.enable_x64(True):
    ref = np.asarray(fast_jit(grad_of_log_decay)(*(jnp.asarray(x) for x in (q, k, v, g))))
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * np.max(np.abs(ref)))


@pytest.mark.parametrize("time,chunk", [(37, 4), (130, 8), (64, 16)])
def test_chunk_state_decay_matrix_route_equals_the_scan_route(time, chunk, monkeypatch):
  """With one decay per head, a pass of at most `chunked.MAX_CHUNK_MATRIX` chunks takes its
  chunk states from a decay-matrix matmul; with the bound at 0 every pass takes the associative
  scan. Both routes, float32, with an initial state, padding (T not a multiple of the chunk) and
  0, -1e4 and -inf log decays mixed in: equal outputs, final states and gradients of all five
  inputs, and equal to the float64 token scan."""
  from dca_jax.ops import chunked as chunked_form  # pylint: disable=import-outside-toplevel
  from dca_jax.ops import scan  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(time * chunk)
  heads, dim = 2, 4
  q, k, v = (rng.normal(size=(2, time, heads, dim)) for _ in range(3))
  g = -rng.exponential(0.4, size=(2, time, heads, 1))
  g.flat[rng.choice(g.size, 3, replace=False)] = [0.0, -1e4, -np.inf]
  s0 = rng.normal(size=(2, heads, dim, dim))
  w_o, w_s = rng.normal(size=(2, time, heads, dim)), rng.normal(size=s0.shape)

  def run(form, args):
    def value(*a):
      o, final = form(*a)
      return jnp.sum(o * w_o) + jnp.sum(final * w_s), (o, final)
    (_, (o, final)), grads = jax.value_and_grad(value, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        *args)
    return jax.tree.map(np.asarray, (o, final, grads))

  args32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, s0)]
  assert -(-time // chunk) <= chunked_form.MAX_CHUNK_MATRIX
  # A fresh closure per route, so that neither reuses the other's trace.
  matrix = run(jax.jit(lambda *a: chunked_form.chunked(*a, chunk_size=chunk)), args32)
  monkeypatch.setattr(chunked_form, "MAX_CHUNK_MATRIX", 0)
  scanned = run(jax.jit(lambda *a: chunked_form.chunked(*a, chunk_size=chunk)), args32)
  with jax.enable_x64(True):
    reference = run(scan.recurrent, [jnp.asarray(x) for x in (q, k, v, g, s0)])
  names = ("o", "final state") + tuple(
      f"d loss / d {n}" for n in ("q", "k", "v", "log_decay", "initial_state"))
  for name, a, b, ref in zip(names, jax.tree.leaves(matrix), jax.tree.leaves(scanned),
                             jax.tree.leaves(reference)):
    assert np.all(np.isfinite(a)), name
    _assert_close(a, b, F32_GRAD_TOL, f"{name}: matrix vs scan route")
    _assert_close(a, ref, F32_GRAD_TOL, f"{name}: matrix route vs float64")
