"""Byte-level text corpora for small language models: what the documents are and their splits.

The vocabulary is the 256 byte values (`VOCAB_SIZE`); text is stored as UTF-8 `bytes`, one entry
per document. Two ways to get a `Corpus`:

* `build_default_corpus()` needs nothing downloaded: it is built from what every Python
  installation ships, the standard library's `.py` sources and its documentation text
  (`pydoc_data.topics`). It depends on the Python version (recorded in `Corpus.info`).
* `load_corpus(path)` reads a text file or a directory of text files.

Documents are assigned to the train / validation / test splits by a hash of their name (90 / 5 /
5 %), so a document is never in two splits and the assignment does not depend on which other
documents exist. Turning documents into batches is `experiments/batches.py`'s job.

Example:
  >>> split_of("json/decoder.py") in SPLITS
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
from typing import Iterator, Mapping, Sequence

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
