"""Tests for `dca_jax.memory_state_update`: one DCA decoding step (`dca_jax/ops/dca_decode.py`).

Token-by-token decoding equals the whole sequence (`attention_compress`), from an empty state and
after a prefill, in every variant of the mechanism, and the step's own argument checks.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracles
from dca_jax import init_state, memory_state_update
from oracles import (BATCH, F32_TOL, HEAD_DIM, HEADS, NUM_FEATURES, ORACLE_TOL, ROTARY, TIME,
                     VALUE_DIM, VARIANTS, WINDOW, assert_states_close, jit_compress, jit_step,
                     random_weights, slice_time, step_weights, weights_and_state)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_decode_and_chained_calls_equal_whole_sequence(variant):
  weights = random_weights(21, **variant)
  reset = jnp.zeros((BATCH, TIME), bool).at[0, 6].set(True)
  full, state_full = jit_compress(weights, window=WINDOW, reset=reset, return_state=True)
  # The whole sequence without reset for the decode comparison (decode steps take no reset).
  plain = jit_compress(weights, window=WINDOW)
  state = init_state(BATCH, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, WINDOW)
  outs = []
  for t in range(TIME):
    o, state = jit_step(state, step_weights(weights, t))
    outs.append(o)
  np.testing.assert_allclose(np.asarray(jnp.stack(outs, 1)), np.asarray(plain), **F32_TOL)
  o1, mid = jit_compress(slice_time(weights, 0, 5), window=WINDOW, return_state=True)
  o2, end = jit_compress(slice_time(weights, 5, TIME), window=WINDOW, state=mid, return_state=True)
  np.testing.assert_allclose(np.asarray(jnp.concatenate([o1, o2], 1)), np.asarray(plain), **F32_TOL)
  assert_states_close(end, state, **F32_TOL)
  np.testing.assert_allclose(np.asarray(full), oracles.dca(weights, WINDOW, reset), **ORACLE_TOL)


@pytest.mark.parametrize("time,window,rotary_base", [(1, 4, ROTARY), (4, 4, ROTARY),
                                                    (13, 4, ROTARY), (9, 1, None)])
def test_decode_steps_equal_whole_sequence(time, window, rotary_base):
  weights = random_weights(time + window, BATCH, time, window)
  full, full_state = jit_compress(weights, window=window, rotary_base=rotary_base, return_state=True)
  state = init_state(BATCH, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, window)
  outs = []
  for t in range(time):
    o_t, state = jit_step(state, step_weights(weights, t), rotary_base=rotary_base)
    outs.append(o_t)
  chex.assert_trees_all_close(jnp.stack(outs, 1), full, **F32_TOL)
  np.testing.assert_allclose(np.asarray(full), oracles.dca(weights, window, None, rotary_base),
                             **ORACLE_TOL)
  assert_states_close(state, full_state, rtol=1e-5, atol=1e-5)


def test_decode_after_prefill_equals_whole_sequence():
  weights = random_weights(11)
  full = jit_compress(weights, window=WINDOW)
  _, state = jit_compress(slice_time(weights, 0, WINDOW), window=WINDOW, return_state=True)
  outs = []
  for t in range(WINDOW, TIME):
    o_t, state = jit_step(state, step_weights(weights, t), rotary_base=ROTARY)
    outs.append(o_t)
  chex.assert_trees_all_close(jnp.stack(outs, 1), full[:, WINDOW:], **F32_TOL)


@pytest.mark.parametrize("row", [0, 1])
def test_batch_one_steps_with_resets_equal_one_call(row):
  """At batch 1 a step reads its ring buffers before writing the new token and orders the write
  after the reads (`dca_memory.read_before_write`); larger batches write first. The same
  function: one row of a prefill of 6 tokens, then steps with resets (a document starts at a
  step, or at the first step), equals one call, outputs and state."""
  weights = jax.tree.map(lambda x: x[row:row + 1], random_weights(29, time=14))
  reset = oracles.document_reset(14, ((0, 9), (0, 6)))[row:row + 1]
  full, full_state = jit_compress(weights, window=WINDOW, reset=reset, return_state=True)
  _, state = jit_compress(slice_time(weights, 0, 6), window=WINDOW, reset=reset[:, :6],
                          return_state=True)
  steps = []
  for t in range(6, 14):
    o_t, state = jit_step(state, step_weights(weights, t), reset=reset[:, t])
    steps.append(o_t)
  np.testing.assert_allclose(np.asarray(jnp.stack(steps, 1)), np.asarray(full[:, 6:]), **F32_TOL)
  assert_states_close(state, full_state, **F32_TOL)


def test_memory_state_update_rejects_bad_arguments():
  weights, state = weights_and_state()
  with pytest.raises(TypeError, match="state"):
    memory_state_update((state.keys,), step_weights(weights, 0))
  with pytest.raises(ValueError, match="weights.q"):
    memory_state_update(state, weights)   # [B, T, ...] weights where one step is expected
  other_batch = init_state(BATCH + 1, HEADS, HEAD_DIM, VALUE_DIM, NUM_FEATURES, WINDOW)
  with pytest.raises(ValueError, match="state.keys"):
    memory_state_update(other_batch, step_weights(weights, 0))
