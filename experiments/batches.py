"""Packed batches of byte documents for training, and covering batches for evaluation.

Two ways to turn documents (a split of an `experiments.corpus.Corpus`, or any `bytes`) into
batches, both returning NumPy dicts (notation: B batch, T time, T = `seq_len`):

* `PackedBatches` / `batch_iterator` for training: documents concatenated in a shuffled order
  (reshuffled every epoch, from the seed), cut into rows of T + 1 bytes, rows shuffled.
* `eval_batches` for validation / test bits per byte: the split in its order, every byte after
  the first predicted exactly once, a padded tail masked out.

No separator byte is inserted between documents: a boolean `reset` marks the input positions
where a new document starts, so a model can clear its state (or mask attention) there.

Example:
  >>> docs = [b"hello world", b"second document", b"third"]
  >>> batches = PackedBatches(docs, seq_len=8, batch_size=2, seed=0)
  >>> batch = batches.batch(0)
  >>> batch["tokens"].shape, batch["tokens"].dtype, batch["reset"].dtype
  ((2, 8), dtype('int32'), dtype('bool'))
  >>> bool((batch["targets"][:, :-1] == batch["tokens"][:, 1:]).all())
  True
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


def _check_positive(**kwargs: int) -> None:
  for name, value in kwargs.items():
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _concat(documents: Iterable[bytes]) -> tuple[np.ndarray, np.ndarray]:
  """Concatenates documents into a uint8 stream [N] and a bool [N] marking document starts."""
  docs = [bytes(d) for d in documents]
  stream = np.frombuffer(b"".join(docs), dtype=np.uint8)
  lengths = np.array([len(d) for d in docs], dtype=np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if docs else lengths
  starts = np.zeros(stream.shape[0], dtype=bool)
  starts[offsets[lengths > 0]] = True
  return stream, starts


def _rows(stream: np.ndarray, starts: np.ndarray, row_starts: np.ndarray, seq_len: int):
  """Gathers rows of seq_len + 1 bytes beginning at `row_starts` [R] into a batch dict."""
  index = row_starts[:, None] + np.arange(seq_len + 1)
  row = stream[index].astype(np.int32)
  return {
      "tokens": row[:, :-1],
      "targets": row[:, 1:],
      "reset": starts[index[:, :-1]],
      "mask": np.ones((row_starts.shape[0], seq_len), dtype=bool),
  }


class PackedBatches:
  """Training batches of documents packed into fixed-length rows, deterministic in the seed.

  Epoch e: the documents are concatenated in the order of a permutation drawn from
  `np.random.default_rng((seed, e))` (empty documents dropped), giving a stream of N bytes
  (N is the same every epoch); row r is `stream[r * T : r * T + T + 1]` for r < R = (N - 1) // T
  (consecutive rows overlap by one byte, so every byte after the first is a target once; the
  last (N - 1) % T targets of the epoch are left out); the R rows are taken in a second
  permutation from the same generator. Batches read this sequence of rows epoch after epoch,
  `batch_size` at a time, so batch `step` holds rows `step * B ... step * B + B - 1` and a batch
  may straddle two epochs. `batch(step)` is random access: resuming from a step needs only the
  step.

  Each batch is a dict of NumPy arrays:
    tokens: int32 [B, T], the input bytes `row[:-1]`;
    targets: int32 [B, T], the next bytes `row[1:]`;
    reset: bool [B, T], True where a document starts at the input position (the byte
      `tokens[b, t]` is the first of a document), so no position should see across it. A row's
      first position is always the start of a fresh context, whatever `reset` says there;
    mask: bool [B, T], all True (every target counts; the key matches `eval_batches`).

  Note the target at the last byte of a document is the first byte of the next one.

  Args:
    documents: the documents, as `bytes` (or anything `bytes()` accepts).
    seq_len: T, the number of input positions per row.
    batch_size: B, rows per batch.
    seed: the seed of the shuffles.
    shuffle: if False, documents keep their order and rows are read in order (every epoch
      alike).

  Raises:
    ValueError: if seq_len or batch_size is not a positive integer, or the documents hold fewer
      than seq_len + 1 bytes (not even one row).

  Example:
    >>> batches = PackedBatches([b"abcdef", b"ghij"], seq_len=4, batch_size=1, seed=0,
    ...                         shuffle=False)
    >>> batches.rows_per_epoch
    2
    >>> b = batches.batch(0)
    >>> bytes(b["tokens"][0].astype("uint8")), b["reset"][0].tolist()
    (b'abcd', [True, False, False, False])
    >>> bytes(batches.batch(1)["tokens"][0].astype("uint8")), batches.batch(1)["reset"][0].tolist()
    (b'efgh', [False, False, True, False])
  """

  def __init__(
      self,
      documents: Iterable[bytes],
      *,
      seq_len: int,
      batch_size: int,
      seed: int,
      shuffle: bool = True,
  ):
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    self.documents = tuple(bytes(d) for d in documents if len(d))
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.num_bytes = sum(len(d) for d in self.documents)
    if self.num_bytes < self.seq_len + 1:
      raise ValueError(
          f"the corpus holds {self.num_bytes} bytes, fewer than one sequence of seq_len + 1 = "
          f"{self.seq_len + 1} bytes; use a smaller seq_len or more text"
      )
    self.rows_per_epoch = (self.num_bytes - 1) // self.seq_len
    self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stream [N], document starts [N] and row order [R] of one epoch (last two cached)."""
    if epoch not in self._cache:
      if self.shuffle:
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(len(self.documents))
        stream, starts = _concat(self.documents[i] for i in order)
        row_order = rng.permutation(self.rows_per_epoch)
      else:
        stream, starts = _concat(self.documents)
        row_order = np.arange(self.rows_per_epoch)
      if len(self._cache) >= 2:
        del self._cache[min(self._cache)]
      self._cache[epoch] = (stream, starts, row_order)
    return self._cache[epoch]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The batch at `step` (0-based); see the class docstring for its content."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    rows = step * self.batch_size + np.arange(self.batch_size)
    epochs = rows // self.rows_per_epoch
    parts = []
    for epoch in np.unique(epochs):
      stream, starts, row_order = self._epoch(int(epoch))
      in_epoch = rows[epochs == epoch] % self.rows_per_epoch
      parts.append(_rows(stream, starts, row_order[in_epoch] * self.seq_len, self.seq_len))
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    step = 0
    while True:
      yield self.batch(step)
      step += 1


def batch_iterator(
    documents: Iterable[bytes],
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    shuffle: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields the training batches of `PackedBatches`, from `start_step`, endlessly or `num_steps`.

  Args:
    documents: the documents, as `bytes`.
    seq_len: T, input positions per row.
    batch_size: B, rows per batch.
    seed: the seed of the shuffles.
    start_step: the first step (to resume a run).
    num_steps: how many batches to yield; None for no end.
    shuffle: see `PackedBatches`.

  Returns:
    An iterator of dicts {"tokens", "targets": int32 [B, T], "reset", "mask": bool [B, T]}.

  Raises:
    ValueError: as `PackedBatches`.

  Example:
    >>> it = batch_iterator([b"x" * 100], seq_len=16, batch_size=4, seed=1, num_steps=2)
    >>> [b["tokens"].shape for b in it]
    [(4, 16), (4, 16)]
  """
  batches = PackedBatches(
      documents, seq_len=seq_len, batch_size=batch_size, seed=seed, shuffle=shuffle
  )

  def generate():
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield batches.batch(step)
      step += 1

  return generate()


def eval_batches(
    documents: Iterable[bytes], seq_len: int, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
  """Covers a split once, in order, for validation / test bits per byte.

  The documents are concatenated in their order into a stream of N bytes; row r is
  `stream[r * T : r * T + T + 1]` for r < ceil((N - 1) / T), so every byte after the first is a
  target exactly once. The last row is padded with zeros and the padding masked out; the last
  batch is padded with fully masked rows so every batch has the same shape (one compilation).
  The sum of `mask` over all batches is N - 1; bits per byte = sum of the masked cross-entropy
  (in nats) / (ln 2 * sum of mask).

  Args:
    documents: the split's documents, as `bytes`.
    seq_len: T, input positions per row.
    batch_size: B, rows per batch.

  Returns:
    An iterator of dicts: "tokens", "targets" int32 [B, T]; "reset" bool [B, T] (as in
    `PackedBatches`); "mask" bool [B, T], True where the target is a real byte.

  Raises:
    ValueError: if seq_len or batch_size is not a positive integer, or the documents hold fewer
      than 2 bytes (nothing to predict).

  Example:
    >>> batches = list(eval_batches([b"abcdefg", b"hij"], seq_len=4, batch_size=2))
    >>> len(batches), int(sum(b["mask"].sum() for b in batches))
    (2, 9)
  """
  _check_positive(seq_len=seq_len, batch_size=batch_size)
  stream, starts = _concat(documents)
  n = stream.shape[0]
  if n < 2:
    raise ValueError(f"the documents hold {n} byte(s); at least 2 are needed for one target")
  num_rows = -(-(n - 1) // seq_len)
  padded_rows = -(-num_rows // batch_size) * batch_size
  # Pad the stream so every row (including the masked filler rows) can be gathered.
  total = padded_rows * seq_len + 1
  stream = np.concatenate([stream, np.zeros(total - n, dtype=np.uint8)])
  starts = np.concatenate([starts, np.zeros(total - n, dtype=bool)])
  target_pos = np.arange(padded_rows)[:, None] * seq_len + np.arange(1, seq_len + 1)
  valid = target_pos < n

  def generate():
    for first in range(0, padded_rows, batch_size):
      row_starts = np.arange(first, first + batch_size) * seq_len
      batch = _rows(stream, starts, row_starts, seq_len)
      batch["mask"] = valid[first : first + batch_size]
      yield batch

  return generate()
