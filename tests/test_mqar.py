"""Tests of experiments/mqar.py: multi-query associative recall batches."""

from __future__ import annotations

import doctest

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from experiments import mqar


def _check_batch(batch, *, batch_size, seq_len, num_pairs, vocab_size):
  """Checks every property of the MQAR layout with a plain loop over rows."""
  tokens, targets, mask = batch["tokens"], batch["targets"], batch["mask"]
  assert tokens.shape == targets.shape == mask.shape == (batch_size, seq_len)
  assert tokens.dtype == targets.dtype == np.int32 and mask.dtype == bool
  assert tokens.min() >= 0 and tokens.max() < vocab_size
  half = vocab_size // 2
  np.testing.assert_array_equal(mask, targets != mqar.IGNORE_INDEX)
  assert (mask.sum(axis=1) == num_pairs).all()
  for row_tokens, row_targets, row_mask in zip(tokens, targets, mask):
    keys = row_tokens[0 : 2 * num_pairs : 2]
    values = row_tokens[1 : 2 * num_pairs : 2]
    assert ((1 <= keys) & (keys < half)).all(), "keys come from [1, V // 2)"
    assert ((half <= values) & (values < vocab_size)).all(), "values come from [V // 2, V)"
    assert len(set(keys.tolist())) == num_pairs and len(set(values.tolist())) == num_pairs
    assert not row_mask[: 2 * num_pairs].any()
    pairs = dict(zip(keys.tolist(), values.tolist()))
    queried = []
    for t in np.flatnonzero(row_mask):
      assert (t - 2 * num_pairs) % 2 == 0
      key = int(row_tokens[t])
      # The answer is the value that followed this key earlier in the sequence.
      earlier = np.flatnonzero(row_tokens[:t] == key)
      assert earlier.size and earlier[0] < 2 * num_pairs
      assert row_targets[t] == row_tokens[earlier[0] + 1] == pairs[key]
      queried.append(key)
    assert sorted(queried) == sorted(pairs), "every key is queried exactly once"


def test_docstring_examples():
  result = doctest.testmod(mqar, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("seq_len,num_pairs", mqar.MQAR_CONFIGS)
def test_zoology_configs(seq_len, num_pairs):
  batch = mqar.mqar_batch(np.random.default_rng(seq_len), batch_size=4, seq_len=seq_len,
                          num_pairs=num_pairs)
  _check_batch(batch, batch_size=4, seq_len=seq_len, num_pairs=num_pairs, vocab_size=8192)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    num_pairs=st.integers(1, 6),
    extra=st.integers(0, 9),
    vocab_extra=st.integers(0, 20),
    batch_size=st.integers(1, 3),
    power_a=st.sampled_from([0.01, 0.5, 1.0, 2.0]),
    random_non_queries=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layout_properties(num_pairs, extra, vocab_extra, batch_size, power_a,
                           random_non_queries, seed):
  seq_len = 4 * num_pairs + extra  # includes the minimal and odd lengths
  vocab_size = 2 * num_pairs + 2 + vocab_extra  # includes the smallest vocabulary
  batch = mqar.mqar_batch(np.random.default_rng(seed), batch_size=batch_size, seq_len=seq_len,
                          num_pairs=num_pairs, vocab_size=vocab_size, power_a=power_a,
                          random_non_queries=random_non_queries)
  _check_batch(batch, batch_size=batch_size, seq_len=seq_len, num_pairs=num_pairs,
               vocab_size=vocab_size)
  if not random_non_queries:
    filler = ~batch["mask"]
    filler[:, : 2 * num_pairs] = False
    assert (batch["tokens"][filler] == mqar.PAD_ID).all()


def test_deterministic_in_the_seed():
  kwargs = dict(batch_size=3, seq_len=128, num_pairs=8)
  a = mqar.mqar_batch(np.random.default_rng(7), **kwargs)
  b = mqar.mqar_batch(np.random.default_rng(7), **kwargs)
  c = mqar.mqar_batch(np.random.default_rng(8), **kwargs)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["tokens"], c["tokens"])


def test_power_law_favours_near_queries():
  num_pairs, seq_len = 4, 256
  space = (seq_len - 2 * num_pairs) // 2
  p = mqar.gap_probabilities(space, 0.01)
  assert np.isclose(p.sum(), 1.0) and (np.diff(p) < 0).all()
  np.testing.assert_allclose(p[0] / p[1], 2 ** 0.99)
  rng = np.random.default_rng(0)

  def mean_gap(power_a):
    batch = mqar.mqar_batch(rng, batch_size=200, seq_len=seq_len, num_pairs=num_pairs,
                            power_a=power_a)
    positions = np.nonzero(batch["mask"])[1]
    return ((positions - 2 * num_pairs) // 2).mean()

  # Uniform slots (a = 1) average about space / 2; a = 0.01 puts queries much nearer.
  assert abs(mean_gap(1.0) - (space - 1) / 2) < 8
  assert mean_gap(0.01) < 0.5 * mean_gap(1.0)


@pytest.mark.parametrize("kwargs,name", [
    (dict(seq_len=15, num_pairs=4), "seq_len"),
    (dict(seq_len=64, num_pairs=0), "num_pairs"),
    (dict(seq_len=64, num_pairs=4, batch_size=0), "batch_size"),
    (dict(seq_len=64, num_pairs=4, vocab_size=9), "vocab_size"),
    (dict(seq_len=64, num_pairs=4, power_a=0.0), "power_a"),
    (dict(seq_len=64, num_pairs=4, power_a=float("nan")), "power_a"),
    (dict(seq_len=64.0, num_pairs=4), "seq_len"),
])
def test_argument_errors(kwargs, name):
  kwargs = {"batch_size": 2, **kwargs}
  with pytest.raises(ValueError, match=name):
    mqar.mqar_batch(np.random.default_rng(0), **kwargs)
  mqar.mqar_batch(np.random.default_rng(0), batch_size=1, seq_len=16, num_pairs=4,
                  vocab_size=10)  # the minimal feasible case works
