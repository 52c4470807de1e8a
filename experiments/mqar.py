"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology.

A sequence of T tokens (notation: B batch, T time, P `num_pairs`, V `vocab_size`) is

    k_1 v_1 k_2 v_2 ... k_P v_P | x x k_3 x k_1 x x x k_P x ...
    \\_____ 2P tokens: pairs ___/ \\_____ T - 2P tokens: queries among noise ______/

* Keys are P distinct ids drawn uniformly from the first half of the vocabulary without id 0,
  [1, V // 2); values are P distinct ids drawn uniformly from the second half, [V // 2, V).
  The halves are disjoint, so a value can never be mistaken for a key.
* Every key is queried exactly once after the pairs. The query region holds `space` =
  (T - 2P) // 2 slots at the even offsets 2P + 2g, g = 0 .. space - 1 (g is the "gap", the
  distance from the end of the pairs counted in slots). The P slots are drawn without
  replacement with probability proportional to (g + 1) ** (power_a - 1), a power law that puts
  most queries close to the pairs for small `power_a` (0.01 in Zoology) and is uniform for
  `power_a = 1`. Slots are drawn one after the other and the i-th drawn slot gets key k_i,
  exactly as Zoology's `multiquery_ar` (`np.random.choice(space, P, replace=False, p=p)` then
  `put_along_axis(..., keys)`); here the successive draws are made for the whole batch at once
  with the Gumbel-top-k trick, which has the same distribution.
* The target at a query position is the queried key's value: the model must output v_i right
  after reading k_i. Every other position has target -100 and mask False, so the loss counts the
  P answers of each sequence only.
* All positions that are neither pairs nor query keys hold noise: ids drawn uniformly from the
  whole vocabulary [0, V) (Zoology's `random_non_queries=True`); with `random_non_queries=False`
  they hold 0, the reserved padding id. Noise may by chance repeat a key or a value; it carries
  no target.

References:
  Arora, Eyuboglu, Timalsina, Johnson, Poli, Zou, Rudra, Ré. "Zoology: Measuring and Improving
  Recall in Efficient Language Models", 2023 (arXiv:2312.04927), Section 3.1 (MQAR) and
  Appendix (the synthetic data generator, `zoology/data/associative_recall.py`).

Example:
  >>> rng = np.random.default_rng(0)
  >>> batch = mqar_batch(rng, batch_size=2, seq_len=64, num_pairs=4)
  >>> batch["tokens"].shape, batch["targets"].dtype, int(batch["mask"].sum())
  ((2, 64), dtype('int32'), 8)
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
PAD_ID = 0

# Zoology's sequence lengths and numbers of key-value pairs: (T, P).
MQAR_CONFIGS = [(64, 4), (128, 8), (256, 16), (512, 64)]


def _check_int(name: str, value: object, minimum: int) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def gap_probabilities(space: int, power_a: float) -> np.ndarray:
  """The power-law weights of the query slots: p[g] proportional to (g + 1) ** (power_a - 1).

  Args:
    space: the number of query slots, (T - 2P) // 2.
    power_a: the exponent parameter a > 0 (Zoology's `power_a`; 1 gives uniform slots).

  Returns:
    float64 [space], summing to 1, decreasing for power_a < 1.

  Example:
    >>> p = gap_probabilities(4, 1.0)
    >>> p.tolist()
    [0.25, 0.25, 0.25, 0.25]
  """
  weights = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1.0)
  return weights / weights.sum()


def _distinct(rng: np.random.Generator, batch_size: int, low: int, high: int, k: int):
  """k distinct ids per row, uniform over [low, high) and in uniform random order: int64 [B, k]."""
  scores = rng.random((batch_size, high - low))
  return low + np.argsort(scores, axis=1)[:, :k]


def mqar_batch(
    rng: np.random.Generator,
    *,
    batch_size: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> dict[str, np.ndarray]:
  """Draws a batch of MQAR sequences (see the module docstring for the layout).

  Args:
    rng: the NumPy generator; the batch is a deterministic function of its state.
    batch_size: B.
    seq_len: T, at least 4 * num_pairs (P pairs take 2P tokens and the P queries need P of the
      (T - 2P) // 2 query slots).
    num_pairs: P, the key-value pairs (and queries) per sequence.
    vocab_size: V; keys come from [1, V // 2), values from [V // 2, V), so V // 2 - 1 >= P.
    power_a: the power-law parameter a > 0 of the query distances (0.01 in Zoology).
    random_non_queries: fill the other positions with uniform ids from [0, V) (Zoology's
      default) if True, else with `PAD_ID` (0).

  Returns:
    A dict of NumPy arrays:
      tokens: int32 [B, T], the input ids;
      targets: int32 [B, T], the value at each query position, `IGNORE_INDEX` (-100) elsewhere;
      mask: bool [B, T], True exactly at the P query positions of each row.

  Raises:
    ValueError: naming the argument, if batch_size, seq_len or num_pairs is not a positive
      integer, seq_len < 4 * num_pairs, vocab_size is too small for P distinct keys and values,
      or power_a is not a positive finite number.

  Example:
    >>> batch = mqar_batch(np.random.default_rng(1), batch_size=1, seq_len=16, num_pairs=2,
    ...                    vocab_size=16, random_non_queries=False)
    >>> query = np.flatnonzero(batch["mask"][0])
    >>> len(query), bool((batch["tokens"][0, query] < 8).all())
    (2, True)
    >>> bool((batch["targets"][0, query] >= 8).all())
    True
  """
  _check_int("batch_size", batch_size, 1)
  _check_int("num_pairs", num_pairs, 1)
  _check_int("seq_len", seq_len, 1)
  _check_int("vocab_size", vocab_size, 1)
  if seq_len < 4 * num_pairs:
    raise ValueError(
        f"seq_len must be >= 4 * num_pairs = {4 * num_pairs} (2 * num_pairs tokens of pairs "
        f"and num_pairs query slots of 2 tokens), got seq_len={seq_len}"
    )
  half = vocab_size // 2
  if half - 1 < num_pairs or vocab_size - half < num_pairs:
    raise ValueError(
        f"vocab_size must be >= {2 * num_pairs + 2} for num_pairs={num_pairs} (keys from "
        f"[1, vocab_size // 2), values from [vocab_size // 2, vocab_size)), got {vocab_size}"
    )
  if not (isinstance(power_a, (int, float, np.floating)) and 0 < power_a < np.inf):
    raise ValueError(f"power_a must be a positive finite number, got {power_a!r}")

  b, t, p = int(batch_size), int(seq_len), int(num_pairs)
  keys = _distinct(rng, b, 1, half, p)
  values = _distinct(rng, b, half, vocab_size, p)
  space = (t - 2 * p) // 2
  # Gumbel-top-k: the order of log p + Gumbel noise is a draw without replacement, slot after
  # slot, with probabilities proportional to p (as np.random.choice(replace=False, p=p)).
  scores = np.log(gap_probabilities(space, float(power_a))) + rng.gumbel(size=(b, space))
  gaps = np.argsort(-scores, axis=1)[:, :p]
  query_pos = 2 * p + 2 * gaps

  if random_non_queries:
    tokens = rng.integers(0, vocab_size, size=(b, t), dtype=np.int64)
  else:
    tokens = np.full((b, t), PAD_ID, dtype=np.int64)
  tokens[:, 0 : 2 * p : 2] = keys
  tokens[:, 1 : 2 * p : 2] = values
  np.put_along_axis(tokens, query_pos, keys, axis=1)
  targets = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
  np.put_along_axis(targets, query_pos, values, axis=1)
  return {
      "tokens": tokens.astype(np.int32),
      "targets": targets.astype(np.int32),
      "mask": targets != IGNORE_INDEX,
  }
