"""Document ids from reset masks: the one place where packed documents get their numbers.

A packed row holds several documents; `reset[b, t]` is true where a new one starts. Every
layer and op that must keep documents apart (masks of the softmax and window forms, the short
convolution, DCA's delayed memory stream) compares these ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_ids(reset: jax.Array) -> jax.Array:
  """Document id of each position: the number of resets up to and including it.

  Args:
    reset: bool [B, T]; true where a new document starts.

  Returns:
    int32 [B, T], non-decreasing along T; positions of one document share an id.

  Example:
    >>> import jax.numpy as jnp
    >>> document_ids(jnp.array([[False, False, True, False, True]])).tolist()
    [[0, 0, 1, 1, 2]]
  """
  # A parallel prefix of additions: on CPU several times faster than jnp.cumsum, which XLA lowers
  # to a quadratic-cost reduce_window.
  return jax.lax.associative_scan(jnp.add, reset.astype(jnp.int32), axis=1)


def nonfinite(x: jax.Array, *, allow_neg_inf: bool = False) -> jax.Array:
  """True where the last axis of `x` holds a NaN or an infinity (-inf allowed when asked)."""
  bad = jnp.isnan(x) | (x == jnp.inf)
  if not allow_neg_inf:
    bad = bad | (x == -jnp.inf)
  return jnp.any(bad, axis=-1)


def zero_where(bad: jax.Array, *xs: jax.Array) -> list[jax.Array]:
  """Each x with the rows flagged by `bad` (x's leading dims) replaced by zeros: a select."""
  return [jnp.where(bad[..., None], 0, x) for x in xs]


def _prefix(op, x, axis=1):
  return jax.lax.associative_scan(op, x, axis=axis)


def sees_nonfinite(bad: jax.Array, doc: jax.Array | None = None, *, window: int | None = None,
                   carried: jax.Array | None = None) -> jax.Array:
  """Which positions can see a non-finite input: the outputs that must be non-finite.

  Attention never lets a position see the future, another document or (for a window) a token
  more than W - 1 steps back; an input there must not change the output. Multiplying it by a
  zero weight is not enough (0 x NaN is NaN), so the ops replace non-finite inputs by zeros
  (select, never multiply) and then mark as NaN exactly the outputs whose visible range holds
  one: a corrupt token poisons what attends to it, and nothing else.

  Args:
    bad: bool [B, T, ...]; true where a position's input is not finite.
    doc: optional int [B, T] non-decreasing document ids (`document_ids`); None: one document.
    window: W, the number of most recent positions a query sees (itself included); None: all.
    carried: optional bool [B, ...] (bad's trailing dims); true where an incoming state is not
      finite. It reaches the positions of document id 0, i.e. those before the first reset
      (with `document_ids`, a reset at the first position gives it id 1).

  Returns:
    bool, bad's shape: true where position t sees a bad position j, i.e. doc(j) = doc(t) and
    t - W < j <= t (or j <= t without a window), or sees a bad carried state.
  """
  time = bad.shape[1]
  extra = (1,) * (bad.ndim - 2)
  count = _prefix(jnp.add, bad.astype(jnp.int32))                        # bad positions in [0, t]
  index = jnp.arange(time, dtype=jnp.int32)
  first = jnp.zeros_like(index)[None]                                     # [1, T]: the first visible
  if doc is not None:
    starts = jnp.concatenate([jnp.ones_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    first = _prefix(jnp.maximum, jnp.where(starts, index, 0))             # [B, T]
  if window is not None:
    first = jnp.maximum(first, index - window + 1)
  first = jnp.broadcast_to(first, bad.shape[:2]).reshape(bad.shape[:2] + extra)
  before = jnp.take_along_axis(count, jnp.maximum(first - 1, 0), axis=1)
  before = jnp.where(first > 0, before, 0)
  seen = count - before > 0
  if carried is not None:
    reached = True if doc is None else (doc == 0).reshape(doc.shape + extra)
    seen = seen | (carried[:, None] & reached)
  return seen
