"""Byte-level text corpora and packed batches for small language models.

The vocabulary is the 256 byte values (`VOCAB_SIZE`); text is stored as UTF-8 `bytes`, one entry
per document. Two ways to get a `Corpus`:

* `build_default_corpus()` needs nothing downloaded: it is built from what every Python
  installation ships, the standard library's `.py` sources and its documentation text
  (`pydoc_data.topics`). It depends on the Python version (recorded in `Corpus.info`).
* `load_corpus(path)` reads a text file or a directory of text files.

Documents are assigned to the train / validation / test splits by a hash of their name (90 / 5 /
5 %), so a document is never in two splits and the assignment does not depend on which other
documents exist.

Two ways to turn documents into batches, both returning NumPy dicts (notation: B batch, T time,
T = `seq_len`):

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

import dataclasses
import hashlib
import os
import pathlib
import platform
import sys
import sysconfig
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

VOCAB_SIZE = 256
SPLITS = ("train", "validation", "test")
# Percentage points of the hash bucket (0..99) below which a document goes to train, validation.
_SPLIT_BOUNDS = (90, 95)

# `load_corpus` reads, in a directory, the files with these suffixes (case-insensitive).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")

# Directories of the standard library that are not part of the default corpus: installed
# packages, caches and the test suites (whose data files include deliberately broken text).
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A byte-level corpus split by document.

  Attributes:
    name: a short name ("python-stdlib-3.11" or the loaded path's name).
    splits: "train", "validation", "test" -> the documents, as `bytes`, in a fixed order.
    names: the same keys -> the name of each document (its relative path, or
      "pydoc_data.topics:<topic>"), aligned with `splits`.
    info: "bytes" and "documents" (split -> count), "sha256" of the three splits concatenated
      (train, validation, test; each split its documents joined with nothing in between),
      "split_sha256" (split -> sha256 of its documents joined), "python_version" for the
      default corpus, "source" and, for `load_corpus`, "skipped" (files that are not UTF-8).
  """

  name: str
  splits: Mapping[str, tuple[bytes, ...]]
  names: Mapping[str, tuple[str, ...]]
  info: Mapping[str, object]


def split_of(name: str) -> str:
  """The split ("train", "validation" or "test") of a document, from a hash of its name.

  The bucket is the first 8 bytes of sha256(name) modulo 100: 0-89 train, 90-94 validation,
  95-99 test. It depends on the name only, so adding or removing other documents never moves
  a document between splits.

  Args:
    name: the document's name (a relative POSIX path, for files).

  Returns:
    The split's name.

  Example:
    >>> split_of("json/decoder.py") in SPLITS
    True
  """
  bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
  if bucket < _SPLIT_BOUNDS[0]:
    return "train"
  if bucket < _SPLIT_BOUNDS[1]:
    return "validation"
  return "test"


def _make_corpus(
    name: str, documents: Sequence[tuple[str, bytes]], info: Mapping[str, object]
) -> Corpus:
  """Splits named documents by `split_of`, keeping their order, and fills in the sizes."""
  splits: dict[str, list[bytes]] = {s: [] for s in SPLITS}
  names: dict[str, list[str]] = {s: [] for s in SPLITS}
  for doc_name, data in documents:
    split = split_of(doc_name)
    splits[split].append(data)
    names[split].append(doc_name)
  return _finish_corpus(name, splits, names, info)


def _finish_corpus(
    name: str,
    splits: Mapping[str, Sequence[bytes]],
    names: Mapping[str, Sequence[str]],
    info: Mapping[str, object],
) -> Corpus:
  total = hashlib.sha256()
  split_sha = {}
  for s in SPLITS:
    h = hashlib.sha256()
    for data in splits[s]:
      h.update(data)
      total.update(data)
    split_sha[s] = h.hexdigest()
  full_info = {
      "bytes": {s: sum(len(d) for d in splits[s]) for s in SPLITS},
      "documents": {s: len(splits[s]) for s in SPLITS},
      "sha256": total.hexdigest(),
      "split_sha256": split_sha,
      **info,
  }
  return Corpus(
      name=name,
      splits={s: tuple(splits[s]) for s in SPLITS},
      names={s: tuple(names[s]) for s in SPLITS},
      info=full_info,
  )


def _walk_sorted(root: pathlib.Path, excluded_dirs: frozenset[str]) -> Iterator[pathlib.Path]:
  """Regular files under `root` in sorted order of relative path, pruning hidden/excluded dirs."""
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(
        d for d in dirnames if d not in excluded_dirs and not d.startswith(".")
    )
    for filename in sorted(filenames):
      if filename.startswith("."):
        continue
      path = pathlib.Path(dirpath) / filename
      if path.is_file():
        yield path


def build_default_corpus() -> Corpus:
  """Builds the default corpus from the Python standard library; nothing is downloaded.

  Documents, in this order:

  1. every `.py` file under `sysconfig.get_paths()["stdlib"]`, in sorted order of relative
     POSIX path, excluding `site-packages`, `dist-packages`, `__pycache__`, hidden directories,
     the test suites (directories named `test`, `tests` or `idle_test`: `test/`,
     `lib2to3/tests/`, `idlelib/idle_test/`, `unittest/test/`, ...), the build-specific
     `config-*` directory and `_sysconfigdata_*.py` (they hold paths of the machine that built
     Python), and files that do not decode as UTF-8; each file is one document named by its
     relative path;
  2. every topic of `pydoc_data.topics.topics` (the text of the language reference that `help()`
     shows), in sorted order of topic name, encoded as UTF-8; named "pydoc_data.topics:<topic>".

  The corpus is identical for identical Python builds; `info["python_version"]` records the
  version (about 12.6 MB with CPython 3.11).

  Returns:
    The `Corpus`, named "python-stdlib-<major>.<minor>".

  Raises:
    ValueError: if the standard library holds no source file (a stripped installation).
  """
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top

  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  documents: list[tuple[str, bytes]] = []
  for path in _walk_sorted(stdlib, _STDLIB_EXCLUDED_DIRS):
    rel = path.relative_to(stdlib)
    if path.suffix != ".py" or path.name.startswith("_sysconfigdata"):
      continue
    if any(part.startswith("config-") for part in rel.parts[:-1]):
      continue
    data = path.read_bytes()
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:
      continue
    documents.append((rel.as_posix(), data))
  if not documents:
    raise ValueError(f"no Python source file found in the standard library at {stdlib}")
  topics = pydoc_data.topics.topics
  for topic in sorted(topics):
    documents.append((f"pydoc_data.topics:{topic}", topics[topic].encode("utf-8")))
  version = f"{sys.version_info.major}.{sys.version_info.minor}"
  info = {
      "python_version": platform.python_version(),
      "python_implementation": platform.python_implementation(),
      "source": "python standard library .py files + pydoc_data.topics",
  }
  return _make_corpus(f"python-stdlib-{version}", documents, info)


def _read_bytes(path: pathlib.Path) -> bytes:
  """Reads a file, turning an OS error into one that names the file."""
  try:
    return path.read_bytes()
  except PermissionError as e:
    raise PermissionError(f"cannot read corpus file {path}: permission denied") from e
  except OSError as e:
    raise OSError(f"cannot read corpus file {path}: {e}") from e


def _split_single_file(data: bytes) -> tuple[bytes, bytes, bytes]:
  """Cuts one text contiguously into 90 / 5 / 5 %, each cut moved to the next line start."""
  cuts = []
  for fraction in (0.90, 0.95):
    cut = int(len(data) * fraction)
    if cut < len(data):
      newline = data.find(b"\n", max(cut - 1, 0))
      cut = len(data) if newline < 0 else newline + 1
    cuts.append(max(cut, cuts[-1]) if cuts else cut)
  return data[: cuts[0]], data[cuts[0] : cuts[1]], data[cuts[1] :]


def load_corpus(path: str | os.PathLike[str]) -> Corpus:
  """Loads a text file or a directory of text files as a byte-level corpus.

  The rule for a directory: every regular file, recursively, whose suffix is one of
  `TEXT_SUFFIXES` (`.txt`, `.md`, `.rst`, `.py`, case-insensitive), skipping hidden files and
  directories (names starting with ".") and `__pycache__`, in sorted order of relative POSIX
  path. Files that do not decode as UTF-8 are skipped (and listed in `info["skipped"]`); empty
  files are kept but contribute nothing. Each file is one document, assigned to a split by
  `split_of` of its path relative to `path` (so a small directory may leave validation or test
  empty: check `info["documents"]`).

  A single file (any suffix) must decode as UTF-8; as one document cannot be shared out by a
  hash, it is cut contiguously, at line boundaries, into the first 90 % (train), the next 5 %
  (validation) and the last 5 % (test), as enwik8 is.

  Args:
    path: a file or a directory.

  Returns:
    The `Corpus`, named after the path's last component.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if `path` is an empty file, a file that is not UTF-8, a directory without a
      non-empty UTF-8 text file, or neither a file nor a directory.
    PermissionError: if a file cannot be read (the message names the file).

  Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (root / "a.txt").write_text("some text\\n")
    >>> corpus = load_corpus(root)
    >>> sum(corpus.info["bytes"].values())
    10
  """
  root = pathlib.Path(path)
  if not root.exists():
    raise FileNotFoundError(f"corpus path {root} does not exist")
  if root.is_file():
    data = _read_bytes(root)
    if not data:
      raise ValueError(f"corpus file {root} is empty")
    try:
      data.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"corpus file {root} is not UTF-8 text: {e}") from e
    parts = _split_single_file(data)
    splits = {s: [p] if p else [] for s, p in zip(SPLITS, parts)}
    names = {s: [f"{root.name}[{s}]"] if p else [] for s, p in zip(SPLITS, parts)}
    info = {"source": str(root), "skipped": []}
    return _finish_corpus(root.name, splits, names, info)
  if not root.is_dir():
    raise ValueError(f"corpus path {root} is neither a file nor a directory")

  documents: list[tuple[str, bytes]] = []
  skipped: list[str] = []
  for file in _walk_sorted(root, frozenset({"__pycache__"})):
    if file.suffix.lower() not in TEXT_SUFFIXES:
      continue
    rel = file.relative_to(root).as_posix()
    data = _read_bytes(file)
    try:
      data.decode("utf-8")
    except UnicodeDecodeError:
      skipped.append(rel)
      continue
    documents.append((rel, data))
  if not any(data for _, data in documents):
    detail = f"; skipped as not UTF-8: {skipped}" if skipped else ""
    raise ValueError(
        f"corpus directory {root} holds no non-empty UTF-8 text file with a suffix in "
        f"{TEXT_SUFFIXES}{detail}"
    )
  info = {"source": str(root), "skipped": skipped}
  return _make_corpus(root.name, documents, info)


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
