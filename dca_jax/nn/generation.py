"""Autoregressive sampling from a `TransformerLM`: one prefill, then a compiled decode loop.

The whole of `generate` (prefill of the prompt, then a `jax.lax.while_loop` of `decode_step`s and
sampling) is one jitted function. Its loop runs `max_new_tokens` steps, a traced value, inside an
output buffer of a static `budget` of tokens: every call with the same model structure, prompt
shape, budget, cache length and top_k reuses one compilation, whatever `max_new_tokens`
(<= budget), temperature or rng. The loop stops at `max_new_tokens`, so an unused budget costs
no compute, only the buffer.

Notation: B batch, P prompt length, N new tokens, V vocabulary size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.ops import _checks

# Arguments of `_generate_impl` that shape the compiled program (part of the jit cache key).
_STATIC = ("graphdef", "budget", "top_k", "max_length")


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: jax.Array | float,
                  top_k: int | None = None) -> jax.Array:
  """Draws one token per row from softmax(logits / temperature), restricted to the top k.

  temperature == 0 gives the argmax (greedy); it may be a traced value, so switching between
  greedy and sampling does not recompile.

  Args:
    logits: [B, V] float.
    rng: a PRNG key.
    temperature: scalar >= 0.
    top_k: None (the whole vocabulary) or k in [1, V]: sample among the k largest logits only
      (exactly k candidates; ties at the k-th value are broken by index). Static.

  Returns:
    [B] int32 token ids.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.array([[0.0, 3.0, 1.0]])
    >>> sample_logits(logits, jax.random.key(0), 0.0)
    Array([1], dtype=int32)
  """
  logits = logits.astype(jnp.float32)
  greedy = _first_argmax(logits)
  # The sampled branch is computed even when greedy wins the select; a floor on the temperature
  # keeps it finite so the unused branch cannot inject NaNs into gradients or debugging.
  scaled_t = jnp.maximum(jnp.asarray(temperature, jnp.float32), 1e-6)
  if top_k is None:
    sampled = _inverse_cdf_sample(logits / scaled_t, rng)
  else:
    values, indices = jax.lax.top_k(logits, top_k)
    choice = _inverse_cdf_sample(values / scaled_t, rng)
    sampled = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def _first_argmax(logits: jax.Array) -> jax.Array:
  """[B] int32 `jnp.argmax(logits, -1)` (the first maximum; the first NaN in a row with one) as
  two plain reductions: XLA:CPU's argmax, a reduction over (value, index) pairs, cost 57 us of a
  ~400 us batch-32 decode step of the demo model (2026-12-03)."""
  top = jnp.max(logits, axis=-1, keepdims=True)                  # NaN if the row has one
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  hit = (logits == top) | jnp.isnan(logits)
  return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1).astype(jnp.int32)


def _inverse_cdf_sample(logits: jax.Array, rng: jax.Array) -> jax.Array:
  """[B] int32 draws from softmax(logits [B, V]) by inverse transform: one uniform u per row,
  the draw is the first index whose cumulative probability exceeds u times the total.

  The same distribution as `jax.random.categorical` (Gumbel-max), from B random numbers
  instead of B x V: on a CPU, generating B x V Gumbel variates cost more than a decode step of
  the demo model at batch 32 (0.3 ms of 1.5 ms, 2026-12-03). A token of probability 0 is never
  drawn (its cumulative sum equals its predecessor's, which is <= u).
  """
  probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(rng, logits.shape[:-1] + (1,), jnp.float32) * cdf[:, -1:]
  drawn = jnp.sum(cdf <= u, axis=-1)
  return jnp.minimum(drawn, logits.shape[-1] - 1).astype(jnp.int32)


def _generate_impl(graphdef: Any, state: Any, prompt: jax.Array, max_new_tokens: jax.Array,
                   rng: jax.Array, temperature: jax.Array, *, budget: int, top_k: int | None,
                   max_length: int) -> jax.Array:
  """The jitted body of `generate`: [B, P] prompt -> [B, budget] tokens, the first N valid."""
  model = nnx.merge(graphdef, state)
  batch = prompt.shape[0]
  cache = model.init_cache(batch, max_length)
  logits, cache = model.prefill(prompt, cache)
  # Step i samples with fold_in(rng, i): token i does not depend on the budget or on N, so a
  # shorter generation is a prefix of a longer one with the same rng.
  first = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k)
  tokens = jnp.zeros((batch, budget), jnp.int32).at[:, 0].set(first)

  # Token i - 1 is fed to produce token i: N - 1 decode steps, so the cache holds P + N - 1.
  def cond(carry):
    return carry[0] < max_new_tokens

  def body(carry):
    i, prev, cache, tokens = carry
    logits, cache = model.decode_step(prev, cache)
    token = sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_k)
    return i + 1, token, cache, tokens.at[:, i].set(token)

  carry = (jnp.ones((), jnp.int32), first, cache, tokens)
  return jax.lax.while_loop(cond, body, carry)[3]


_generate_jit = jax.jit(_generate_impl, static_argnames=_STATIC)


def generate(model: nnx.Module, prompt: jax.Array, *, max_new_tokens: int, rng: jax.Array,
             temperature: float = 1.0, top_k: int | None = None, budget: int | None = None,
             max_length: int | None = None) -> jax.Array:
  """Samples `max_new_tokens` continuations of `prompt` with the model's decode cache.

  Prefills the prompt into a fresh cache, samples the first new token from the last prompt
  position, then loops `decode_step` + sampling inside `jax.lax.while_loop`, all in one jitted
  function. The loop length N = max_new_tokens is traced; the compiled program depends only on
  the model's structure (not its parameter values), prompt shape and dtype, `budget`,
  `max_length` and `top_k`. Pass the same `budget` for calls of different lengths to compile
  once; by default it is N rounded up to a power of two (at least 16).

  Only the new tokens are returned; the full sequence is
  `jnp.concatenate([prompt, tokens], axis=1)`. All rows share one length (no early stop).

  Args:
    model: a `TransformerLM` (anything with `init_cache`, `prefill` and `decode_step` of the same
      signatures and vocabulary-sized logits).
    prompt: [B, P] integer ids in [0, V), P >= 1.
    max_new_tokens: N, an integer in [1, budget].
    rng: a PRNG key (typed `jax.random.key` or raw `PRNGKey`).
    temperature: >= 0; 0 samples greedily (argmax). Traced: changing it does not recompile.
    top_k: None, or sample among the k most likely tokens only (1 <= k <= V; k = 1 is greedy).
    budget: the static loop capacity (an integer >= N); see above.
    max_length: the cache length, at least P + N - 1 (the last token is never fed back); default
      P + budget. Only softmax attention's cache depends on it.

  Returns:
    [B, N] int32 token ids in [0, V).

  Raises:
    TypeError: prompt not an integer array.
    ValueError: naming the argument: prompt not [B, P] with P >= 1, N < 1 or N > budget,
      temperature < 0, top_k outside [1, V], or max_length < P + N - 1.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from dca_jax.nn.transformer import TransformerConfig, TransformerLM
    >>> config = TransformerConfig(d_model=32, num_layers=1, num_heads=2, attention="linear")
    >>> model = TransformerLM(config, rngs=nnx.Rngs(0))
    >>> prompt = jnp.array([[72, 105, 32]])
    >>> out = generate(model, prompt, max_new_tokens=5, rng=jax.random.key(0), top_k=20)
    >>> out.shape
    (1, 5)
  """
  if not hasattr(prompt, "shape") or not hasattr(prompt, "dtype"):
    raise TypeError(f"prompt must be an integer array of shape [B, P], got {type(prompt).__name__}.")
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must have shape [B, P] with P >= 1, got shape {tuple(prompt.shape)}.")
  if not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise TypeError(f"prompt must have an integer dtype, got {prompt.dtype}.")
  _checks.check_positive_int("max_new_tokens", max_new_tokens)
  if budget is None:
    budget = max(16, 1 << (int(max_new_tokens) - 1).bit_length())
  _checks.check_positive_int("budget", budget)
  if max_new_tokens > budget:
    raise ValueError(f"max_new_tokens must be <= budget, got max_new_tokens = {max_new_tokens} "
                     f"and budget = {budget}.")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}.")
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if top_k is not None:
    _checks.check_positive_int("top_k", top_k)
    if vocab is not None and top_k > vocab:
      raise ValueError(f"top_k must be <= vocab_size = {vocab}, got {top_k}.")
  prompt_length = prompt.shape[1]
  if max_length is None:
    max_length = prompt_length + budget
  _checks.check_positive_int("max_length", max_length)
  if max_length < prompt_length + max_new_tokens - 1:
    raise ValueError(
        f"max_length must hold the prompt and the new tokens fed back, at least P + N - 1 = "
        f"{prompt_length + max_new_tokens - 1}, got {max_length}.")
  graphdef, state = nnx.split(model)
  tokens = _generate_jit(graphdef, state, prompt, jnp.asarray(max_new_tokens, jnp.int32), rng,
                         jnp.asarray(temperature, jnp.float32), budget=int(budget),
                         top_k=None if top_k is None else int(top_k), max_length=int(max_length))
  return tokens[:, :max_new_tokens]
