"""Tests for `dca_jax.nn.transformer` (the language model) and `dca_jax.nn.generation`.

Equivalence is the heart: for every attention layer, the full forward equals prefill + decode
token by token and two chained prefills; a reset mask equals separate runs per document; greedy
generation equals argmax chaining with the full forward. Plus the wiring against a NumPy float64
oracle, gradients to every parameter, a compile-count guard on `generate` and config errors.
"""

from __future__ import annotations

import contextlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dca_jax.nn import (ATTENTION_TYPES, TransformerConfig, TransformerLM, count_params, generate,
                        layer_spec, sample_logits)
import oracles
from oracles import module_jit

VOCAB, D_MODEL, LAYERS, HEADS, WINDOW = 256, 32, 2, 2, 4
# Logits are O(1); prefill and decode take different engine forms, so allow float32 reordering.
TOL = dict(rtol=1e-4, atol=1e-4)


AVAILABLE = ATTENTION_TYPES
OPTIONS = {"dca": {"window": WINDOW}, "window": {"window": WINDOW}}


def make_model(attention="dca", seed=0, **overrides):
  fields = dict(vocab_size=VOCAB, d_model=D_MODEL, num_layers=LAYERS, num_heads=HEADS,
                attention=attention, attention_options=OPTIONS.get(attention, {}))
  fields.update(overrides)
  return TransformerLM(TransformerConfig(**fields), rngs=nnx.Rngs(seed))


def random_tokens(shape, seed=1):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, dtype=jnp.int32)


# Jitted calls of a read-only model (`oracles.module_jit`): eager execution of the DCA engine would
# compile hundreds of single-op programs; one cheaply compiled program per shape is far cheaper,
# and models of the same structure share compilations across tests.
forward = module_jit(lambda model, tokens, reset=None: model(tokens, reset=reset))
prefill = module_jit(lambda model, tokens, cache: model.prefill(tokens, cache))
decode_step = module_jit(lambda model, token, cache: model.decode_step(token, cache))


def test_dca_and_the_registry_are_available():
  assert "dca" in AVAILABLE
  assert layer_spec("dca").layer.__name__ == "DCAttention"
  with pytest.raises(ValueError, match="'dca', 'softmax', 'window', 'linear', 'gla'"):
    layer_spec("flash")


# Decoding equivalences, for every attention layer.


# One sequence length for the decoding tests, so that compilations are shared between them.
T = 13


@pytest.mark.parametrize("attention", AVAILABLE)
def test_full_forward_equals_prefill_then_decode_and_chained_prefills(attention):
  model = make_model(attention)
  # 13 tokens, over three windows (4): prefilled 5 then decoded 8, or prefilled 5 then 8.
  tokens = random_tokens((2, T))
  full = forward(model, tokens)
  assert full.shape == (2, T, VOCAB) and full.dtype == jnp.float32

  cache = model.init_cache(2, max_length=T)
  first, after_prompt = prefill(model, tokens[:, :5], cache)
  steps, cache = [first], after_prompt
  for t in range(5, T):
    logits_t, cache = decode_step(model, tokens[:, t], cache)
    steps.append(logits_t[:, None])
  chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, **TOL)

  second, chained = prefill(model, tokens[:, 5:], after_prompt)
  chex.assert_trees_all_close(jnp.concatenate([first, second], axis=1), full, **TOL)
  # Same state either way (up to float reordering).
  oracles.assert_caches_close(chained, cache, **TOL)


@pytest.mark.parametrize("attention", AVAILABLE)
def test_reset_equals_separate_documents(attention):
  model = make_model(attention)
  tokens = random_tokens((2, T), seed=2)
  # Row 0: documents [0, 6) and [6, 13) (the second longer than the window); row 1: [0, 3),
  # [3, 4) (one token) and [4, 13). A reset at t = 0 is a no-op.
  starts = ((0, 6), (0, 3, 4))
  reset = np.zeros((2, T), bool)
  for row, row_starts in enumerate(starts):
    reset[row, list(row_starts)] = True
  logits = forward(model, tokens, jnp.asarray(reset))
  # Each document alone at the start of a row, padded to T with later tokens that causality
  # hides; round j runs the j-th document of every row, all in the same [2, T] program.
  only_first = jnp.zeros((2, T), bool).at[:, 0].set(True)
  for j in range(max(map(len, starts))):
    rows, spans = [], []
    for row, row_starts in enumerate(starts):
      bounds = row_starts + (T,)
      if j < len(row_starts):
        start, stop = bounds[j], bounds[j + 1]
        rows.append(jnp.roll(tokens[row], -start))
        spans.append((row, start, stop))
      else:
        rows.append(tokens[row])
    alone = forward(model, jnp.stack(rows), only_first)
    for row, start, stop in spans:
      chex.assert_trees_all_close(logits[row, start:stop], alone[row, :stop - start], **TOL)


@pytest.mark.parametrize("attention", AVAILABLE)
def test_cross_entropy_gradient_reaches_every_parameter(attention):
  model = make_model(attention)
  tokens = random_tokens((2, T), seed=3)

  def loss_fn(model):
    logits = model(tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

  loss, grads = module_jit(nnx.value_and_grad(loss_fn))(model)
  # Random init: the loss is near that of a uniform guess, ln 256.
  assert abs(float(loss) - math.log(VOCAB)) < 1.5
  flat = nnx.to_flat_state(grads)
  assert len(flat) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, leaf in flat:
    g = np.asarray(leaf[...])
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, f"zero gradient for {path}"


# The wiring, against a float64 oracle that reuses only the attention layers themselves.


def _np_rmsnorm(x, scale, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("tie", [True, False])
def test_forward_matches_float64_wiring_oracle(tie):
  model = make_model("dca", tie_embeddings=tie)
  eps = model.config.norm_eps
  tokens = random_tokens((2, T), seed=4)
  attend = module_jit(lambda attn, h: attn(h))
  p = lambda v: np.asarray(v[...], np.float64)
  silu = lambda a: a / (1 + np.exp(-a))
  x = p(model.embed.embedding)[np.asarray(tokens)] * math.sqrt(D_MODEL)
  for block in model.blocks:
    h = _np_rmsnorm(x, p(block.attn_norm.scale), eps)
    x = x + np.asarray(attend(block.attn, jnp.asarray(h, jnp.float32)), np.float64)
    h = _np_rmsnorm(x, p(block.mlp_norm.scale), eps)
    x = x + (silu(h @ p(block.mlp.gate.kernel)) * (h @ p(block.mlp.up.kernel))) @ p(block.mlp.down.kernel)
  h = _np_rmsnorm(x, p(model.final_norm.scale), eps)
  expected = h @ (p(model.embed.embedding).T if tie else p(model.head.kernel))
  np.testing.assert_allclose(np.asarray(forward(model, tokens)), expected, rtol=1e-4, atol=1e-4)


def test_sizes_dtypes_and_param_count():
  tied, untied = make_model(), make_model(tie_embeddings=False)
  assert count_params(untied) - count_params(tied) == VOCAB * D_MODEL
  config = tied.config
  assert config.mlp_hidden == 88  # 8/3 * 32 = 85.3, rounded up to a multiple of 8
  assert tied.blocks[0].mlp.gate.kernel.shape == (D_MODEL, 88)
  assert TransformerConfig(d_model=32, num_heads=2, mlp_ratio=4, mlp_multiple_of=32).mlp_hidden == 128
  per_block = 2 * D_MODEL + 3 * D_MODEL * 88 + count_params(tied.blocks[0].attn)
  assert count_params(tied) == VOCAB * D_MODEL + LAYERS * per_block + D_MODEL

  half = make_model(dtype="bfloat16")
  tokens = random_tokens((2, T))
  logits = forward(half, tokens)
  assert logits.dtype == jnp.float32
  assert half.embed.embedding[...].dtype == jnp.float32
  # bfloat16 compute keeps the float32 model's argmax-level behaviour at init.
  np.testing.assert_allclose(np.asarray(logits), np.asarray(forward(tied, tokens)), atol=0.15)


def test_caches_are_one_per_layer_and_checked():
  model = make_model("dca")
  cache = model.init_cache(3, max_length=8)
  assert isinstance(cache, tuple) and len(cache) == LAYERS
  with pytest.raises(TypeError, match="tuple of 2 per-layer caches"):
    model.prefill(random_tokens((3, 4)), cache[:1])
  with pytest.raises(ValueError, match="batch"):
    model.prefill(random_tokens((2, 4)), cache)
  with pytest.raises(ValueError, match="max_length"):
    model.init_cache(3, max_length=0)
  with pytest.raises(TypeError, match="integer dtype"):
    model(jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"token must have shape \[B\]"):
    model.decode_step(random_tokens((3, 1)), cache)
  with pytest.raises(ValueError, match="reset must have shape"):
    model(random_tokens((2, 4)), reset=jnp.zeros((2, 5), bool))


# Config validation.


@pytest.mark.parametrize("fields, field", [
    (dict(attention="flash"), "attention"),
    (dict(d_model=30, num_heads=4), "num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(dtype="int8"), "dtype"),
    (dict(dtype="float31"), "dtype"),
    (dict(param_dtype=None), "param_dtype"),
    (dict(attention_options=[1, 2]), "attention_options"),
    (dict(attention_options=[("window", 4), ("window", 8)]), "attention_options"),
    (dict(attention_options={"window": [4]}), "attention_options"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
])
def test_config_errors_name_the_field(fields, field):
  with pytest.raises(ValueError, match=field):
    TransformerConfig(**fields)


def test_config_is_hashable_and_options_normalised():
  a = TransformerConfig(attention_options={"window": 8, "feature_dim": 4})
  b = TransformerConfig(attention_options=(("feature_dim", 4), ("window", 8)))
  assert a == b and hash(a) == hash(b)
  assert a.attention_kwargs == {"feature_dim": 4, "window": 8}
  assert TransformerConfig(dtype=jnp.bfloat16) == TransformerConfig(dtype="bfloat16")
  assert TransformerConfig(dtype=jnp.bfloat16).dtype == "bfloat16"
  with pytest.raises(TypeError, match="windw"):
    make_model("dca", attention_options={"windw": 8})


# Generation.


def _greedy_by_hand(model, prompt, n):
  """Argmax chaining with the full forward: the sequence is padded to a fixed length once, so
  one compiled forward serves every step (causality makes the padding invisible)."""
  batch, length = prompt.shape
  seq = jnp.concatenate([prompt, jnp.zeros((batch, n), prompt.dtype)], axis=1)
  for i in range(n):
    logits = forward(model, seq)
    seq = seq.at[:, length + i].set(jnp.argmax(logits[:, length + i - 1], axis=-1))
  return seq[:, length:]


@contextlib.contextmanager
def compilations():
  """The names of the programs XLA compiles inside the block (backend compile events)."""
  names = []

  def listener(event, duration, **kwargs):
    del duration
    if "backend_compile" in event:
      names.append(str(kwargs.get("fun_name", "")))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def generate_programs(names):
  """The compiled programs of generate's jitted loop among `names`.

  Eager slices and the like compile programs of their own; generate's carries its name. The
  second half of the compile-count test checks that a new program of generate is seen here, so
  this filter cannot silently miss it.
  """
  return [name for name in names if "generate" in name]


def test_generate_greedy_matches_argmax_chaining_and_compiles_once():
  model = make_model("dca", num_layers=1)
  prompt = random_tokens((2, 6), seed=5)
  # Every call below has the same budget, prompt shape and top_k: one compiled program (none if
  # an earlier test of this process compiled it already) must serve them all.
  common = dict(rng=jax.random.key(0), budget=16)

  with compilations() as compiled:
    greedy = generate(model, prompt, max_new_tokens=9, temperature=0.0, **common)
    assert greedy.shape == (2, 9) and greedy.dtype == jnp.int32
    np.testing.assert_array_equal(greedy, _greedy_by_hand(model, prompt, 9))
    shorter = generate(model, prompt, max_new_tokens=5, temperature=0.0, **common)
    np.testing.assert_array_equal(shorter, greedy[:, :5])

    # Sampling: a prefix property (token i uses fold_in(rng, i)) and the range, still no
    # recompilation.
    sampled = generate(model, prompt, max_new_tokens=9, temperature=1.5, **common)
    assert ((0 <= sampled) & (sampled < VOCAB)).all()
    np.testing.assert_array_equal(
        generate(model, prompt, max_new_tokens=4, temperature=1.5, **common), sampled[:, :4])
    assert not np.array_equal(sampled, greedy)  # temperature 1.5 over 256 tokens
    # Same structure, other parameter values: still the same program.
    other = make_model("dca", seed=7, num_layers=1)
    generate(other, prompt, max_new_tokens=16, temperature=0.0, **common)
  assert len(generate_programs(compiled)) <= 1, compiled

  # The guard is live: a new budget is a new program, and it is counted.
  with compilations() as compiled:
    generate(model, prompt, max_new_tokens=5, temperature=0.0, rng=jax.random.key(0), budget=32)
  assert len(generate_programs(compiled)) == 1, compiled


def test_generate_top1_sampling_equals_greedy():
  # Softmax attention's KV cache at its tightest, P + N - 1 = 12: a token stored past the end
  # would turn the outputs into NaN (see SoftmaxAttention) and break the argmax match.
  model = make_model("softmax", num_layers=1)
  prompt = random_tokens((2, 5), seed=6)
  common = dict(max_new_tokens=8, budget=8, max_length=12)
  greedy = generate(model, prompt, rng=jax.random.key(1), temperature=0.0, **common)
  top1 = generate(model, prompt, rng=jax.random.key(2), temperature=2.0, top_k=1, **common)
  np.testing.assert_array_equal(top1, greedy)
  np.testing.assert_array_equal(greedy, _greedy_by_hand(model, prompt, 8))


def test_sample_logits_top_k_and_temperature():
  logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 2000))
  draws = np.asarray(sample_logits(logits, jax.random.key(0), 1.0, top_k=2))
  assert set(np.unique(draws)) == {2, 3}
  assert abs((draws == 3).mean() - 4 / 7) < 0.05
  draws = np.asarray(sample_logits(logits, jax.random.key(0), 1.0))
  assert abs((draws == 0).mean() - 0.1) < 0.03
  np.testing.assert_array_equal(sample_logits(logits, jax.random.key(0), 0.0, top_k=3), 3)


def test_greedy_choice_is_jnp_argmax_with_ties_and_nans():
  from dca_jax.nn.generation import _first_argmax
  logits = np.array(jax.random.normal(jax.random.key(5), (64, 37)))
  logits[1, [3, 9, 20]] = 10.0                                   # ties: the first wins
  logits[2, [4, 11]] = np.nan                                    # NaN: the first NaN wins
  logits[3, :] = -np.inf
  logits[4, 7] = np.inf
  np.testing.assert_array_equal(_first_argmax(jnp.asarray(logits)),
                                jnp.argmax(jnp.asarray(logits), axis=-1))


def test_sample_logits_frequencies_and_zero_probability_tokens():
  # Inverse-CDF sampling: the frequencies of 20,000 draws match the distribution, and tokens of
  # probability 0 (logit -inf), first, inner or last, are never drawn.
  probs = np.array([0.0, 0.1, 0.2, 0.0, 0.7, 0.0])
  with np.errstate(divide="ignore"):
    logits = jnp.asarray(np.log(np.tile(probs, (20000, 1))), jnp.float32)
  draws = np.asarray(sample_logits(logits, jax.random.key(3), 1.0))
  freq = np.bincount(draws, minlength=6) / draws.size
  assert freq[[0, 3, 5]].sum() == 0
  np.testing.assert_allclose(freq, probs, atol=0.012)
  # Temperature 0.5 squares the probabilities (renormalised).
  draws = np.asarray(sample_logits(logits, jax.random.key(4), 0.5))
  sharp = probs ** 2 / (probs ** 2).sum()
  np.testing.assert_allclose(np.bincount(draws, minlength=6) / draws.size, sharp, atol=0.012)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=9, budget=8), "budget"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=VOCAB + 1), "top_k"),
    (dict(max_new_tokens=4, max_length=6), "max_length"),
])
def test_generate_errors(kwargs, match):
  model = make_model("dca", num_layers=1)
  kwargs = {"max_new_tokens": 3, "rng": jax.random.key(0), **kwargs}
  with pytest.raises(ValueError, match=match):
    generate(model, random_tokens((1, 4)), **kwargs)
  with pytest.raises(ValueError, match="prompt"):
    generate(model, random_tokens((4,)), max_new_tokens=3, rng=jax.random.key(0))

