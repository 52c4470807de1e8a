"""Tests of experiments/corpus.py and batches.py: the default corpus, load_corpus, packed and eval
batches."""

from __future__ import annotations

import doctest
import pathlib

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from experiments import batches as batches_lib
from experiments import corpus as corpus_lib

MARK = 255  # first byte of every synthetic document; other bytes are < MARK


@pytest.fixture(scope="module")
def default_corpus():
  return corpus_lib.build_default_corpus()


def _docs(rng: np.random.Generator, lengths) -> list[bytes]:
  """Synthetic documents: MARK then random bytes < MARK, so a start is visible in the data."""
  return [bytes([MARK]) + rng.integers(0, MARK, size=n - 1, dtype=np.uint8).tobytes()
          for n in lengths]


def test_docstring_examples():
  for module in (corpus_lib, batches_lib):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- the default corpus -------------------------------------------------------------------


def test_default_corpus_is_deterministic(default_corpus):
  again = corpus_lib.build_default_corpus()
  assert again.info["sha256"] == default_corpus.info["sha256"]
  assert again.names == default_corpus.names
  assert again.info["python_version"] == default_corpus.info["python_version"]


def test_default_corpus_splits_are_disjoint_and_nonempty(default_corpus):
  seen = set()
  for split in corpus_lib.SPLITS:
    names = default_corpus.names[split]
    docs = default_corpus.splits[split]
    assert len(names) == len(docs) > 0
    assert default_corpus.info["bytes"][split] == sum(map(len, docs)) > 0
    assert all(corpus_lib.split_of(n) == split for n in names)
    assert seen.isdisjoint(names)
    seen.update(names)
  assert len(seen) == sum(default_corpus.info["documents"].values())
  # Most bytes go to train (90 % of documents by hash).
  sizes = default_corpus.info["bytes"]
  assert sizes["train"] > 5 * (sizes["validation"] + sizes["test"])


def test_default_corpus_content(default_corpus):
  names = [n for s in corpus_lib.SPLITS for n in default_corpus.names[s]]
  assert any(n.startswith("pydoc_data.topics:") for n in names)
  assert "json/decoder.py" in names
  for n in names:
    parts = n.split("/")
    assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), n
    assert not parts[-1].startswith("_sysconfigdata"), n
  for docs in default_corpus.splits.values():
    for d in docs[:50]:
      d.decode("utf-8")


# --- load_corpus ----------------------------------------------------------------------------


def test_load_corpus_directory(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / ".hidden").mkdir()
  files = {
      "b.txt": "bee\n",
      "a.md": "# title\n",
      "sub/c.py": "x = 1\n",
      "sub/d.RST": "Heading\n=======\n",
      "sub/empty.txt": "",
  }
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  (tmp_path / "image.bin").write_bytes(b"\x00\x01")
  (tmp_path / ".secret.txt").write_text("hidden\n")
  (tmp_path / ".hidden" / "e.txt").write_text("hidden\n")
  (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))

  corpus = corpus_lib.load_corpus(tmp_path)
  assert corpus.name == tmp_path.name
  assert corpus.info["skipped"] == ["latin.txt"]
  by_name = {}
  for split in corpus_lib.SPLITS:
    assert list(corpus.names[split]) == sorted(corpus.names[split])
    for name, doc in zip(corpus.names[split], corpus.splits[split]):
      assert corpus_lib.split_of(name) == split
      by_name[name] = doc
  assert by_name == {k: v.encode() for k, v in files.items()}
  assert sum(corpus.info["bytes"].values()) == sum(len(v) for v in files.values())
  # Same directory, same corpus.
  assert corpus_lib.load_corpus(str(tmp_path)).info["sha256"] == corpus.info["sha256"]


def test_load_corpus_single_file_is_cut_at_lines(tmp_path):
  lines = [f"line {i}\n" for i in range(200)]
  path = tmp_path / "book.dat"
  path.write_text("".join(lines))
  corpus = corpus_lib.load_corpus(path)
  parts = [b"".join(corpus.splits[s]) for s in corpus_lib.SPLITS]
  assert b"".join(parts) == path.read_bytes()
  assert all(p and p.endswith(b"\n") for p in parts)
  total = len(path.read_bytes())
  assert 0.85 * total < len(parts[0]) <= 0.91 * total


def test_load_corpus_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    corpus_lib.load_corpus(tmp_path / "nowhere")
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match="empty"):
    corpus_lib.load_corpus(tmp_path / "empty.txt")
  (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
  with pytest.raises(ValueError, match="bad.txt"):
    corpus_lib.load_corpus(tmp_path / "bad.txt")
  with pytest.raises(ValueError, match="no non-empty UTF-8"):
    corpus_lib.load_corpus(tmp_path)  # only an empty and a non-UTF-8 file
  empty_dir = tmp_path / "void"
  empty_dir.mkdir()
  with pytest.raises(ValueError, match="void"):
    corpus_lib.load_corpus(empty_dir)

  locked = tmp_path / "locked"
  locked.mkdir()
  secret = locked / "secret.txt"
  secret.write_text("text\n")
  original = pathlib.Path.read_bytes

  def read_bytes(self):
    # chmod 000 does not stop root, so refuse the read the way the OS would.
    if self.name == "secret.txt":
      raise PermissionError(13, "Permission denied", str(self))
    return original(self)

  monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
  with pytest.raises(PermissionError, match="secret.txt"):
    corpus_lib.load_corpus(locked)
  with pytest.raises(PermissionError, match="secret.txt"):
    corpus_lib.load_corpus(secret)


# --- packed training batches ----------------------------------------------------------------


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8),
    seq_len=st.integers(1, 17),
    batch_size=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_packing_in_order(lengths, seq_len, batch_size, seed):
  docs = _docs(np.random.default_rng(seed), lengths)
  stream = np.frombuffer(b"".join(docs), np.uint8)
  hypothesis.assume(stream.size >= seq_len + 1)
  batches = batches_lib.PackedBatches(docs, seq_len=seq_len, batch_size=batch_size, seed=seed,
                               shuffle=False)
  rows = batches.rows_per_epoch
  assert rows == (stream.size - 1) // seq_len
  for step in range(3):
    b = batches.batch(step)
    assert b["tokens"].shape == b["targets"].shape == b["reset"].shape == (batch_size, seq_len)
    assert b["tokens"].dtype == b["targets"].dtype == np.int32 and b["reset"].dtype == bool
    assert b["mask"].all()
    for i in range(batch_size):
      start = ((step * batch_size + i) % rows) * seq_len
      np.testing.assert_array_equal(b["tokens"][i], stream[start : start + seq_len])
      np.testing.assert_array_equal(b["targets"][i], stream[start + 1 : start + seq_len + 1])
    np.testing.assert_array_equal(b["reset"], b["tokens"] == MARK)


def test_packing_shuffled_is_deterministic_and_reset_at_starts():
  docs = _docs(np.random.default_rng(0), [7, 30, 1, 12, 45, 3, 20])
  kwargs = dict(seq_len=8, batch_size=3)
  a = batches_lib.PackedBatches(docs, seed=5, **kwargs)
  again = list(batches_lib.batch_iterator(docs, seed=5, num_steps=12, **kwargs))
  other = batches_lib.PackedBatches(docs, seed=6, **kwargs)
  differs = False
  for step in range(12):
    x = a.batch(step)
    for k in x:
      np.testing.assert_array_equal(x[k], again[step][k])
    differs |= not np.array_equal(x["tokens"], other.batch(step)["tokens"])
    np.testing.assert_array_equal(x["reset"], x["tokens"] == MARK)
    np.testing.assert_array_equal(x["targets"][:, :-1], x["tokens"][:, 1:])
  assert differs
  # Resuming from a step gives the same batches.
  resumed = next(batches_lib.batch_iterator(docs, seed=5, start_step=7, **kwargs))
  np.testing.assert_array_equal(resumed["tokens"], a.batch(7)["tokens"])
  # Epochs are reshuffled: the first epoch's rows differ from the second's.
  r = a.rows_per_epoch
  one = batches_lib.PackedBatches(docs, seq_len=8, batch_size=r, seed=5)
  e0, e1 = one.batch(0)["tokens"], one.batch(1)["tokens"]
  assert not np.array_equal(e0, e1)
  # One epoch is R = (N - 1) // T rows.
  total = sum(map(len, docs))
  assert e0.size == r * 8 and r == (total - 1) // 8


def test_packing_tiny_corpus_and_bad_args():
  with pytest.raises(ValueError, match="fewer than one sequence"):
    batches_lib.PackedBatches([b"abc", b"de"], seq_len=5, batch_size=1, seed=0)
  batches_lib.PackedBatches([b"abc", b"def"], seq_len=5, batch_size=1, seed=0)  # 6 bytes: one row
  with pytest.raises(ValueError, match="seq_len"):
    batches_lib.PackedBatches([b"abcdef"], seq_len=0, batch_size=1, seed=0)
  with pytest.raises(ValueError, match="batch_size"):
    batches_lib.batch_iterator([b"abcdef"], seq_len=2, batch_size=0, seed=0)


def test_packing_default_corpus_smoke(default_corpus):
  batches = batches_lib.PackedBatches(default_corpus.splits["validation"], seq_len=128,
                                      batch_size=4, seed=0)
  b = batches.batch(0)
  assert b["tokens"].shape == (4, 128)
  assert 0 <= b["tokens"].min() and b["tokens"].max() < corpus_lib.VOCAB_SIZE


# --- evaluation batches ---------------------------------------------------------------------


@pytest.mark.parametrize("lengths,seq_len,batch_size", [
    ([1, 1], 1, 1),
    ([5, 17, 2, 9], 4, 3),
    ([64], 8, 2),  # 63 targets: the last row is partly padding
    ([10, 11], 7, 8),  # fewer rows than one batch
])
def test_eval_batches_cover_once(lengths, seq_len, batch_size):
  docs = _docs(np.random.default_rng(1), lengths)
  stream = np.frombuffer(b"".join(docs), np.uint8)
  batches = list(batches_lib.eval_batches(docs, seq_len, batch_size))
  targets, tokens, resets = [], [], []
  for b in batches:
    assert b["tokens"].shape == b["mask"].shape == (batch_size, seq_len)
    targets.append(b["targets"][b["mask"]])
    tokens.append(b["tokens"][b["mask"]])
    resets.append(b["reset"][b["mask"]])
    np.testing.assert_array_equal(b["reset"], b["tokens"] == MARK)
  assert sum(int(b["mask"].sum()) for b in batches) == stream.size - 1
  np.testing.assert_array_equal(np.concatenate(targets), stream[1:])
  np.testing.assert_array_equal(np.concatenate(tokens), stream[:-1])
  starts = np.cumsum([0] + lengths[:-1])
  starts = starts[starts < stream.size - 1]  # a start at the last byte is no input
  assert np.flatnonzero(np.concatenate(resets)).tolist() == starts.tolist()
  # Only the last batch may be padding.
  assert all(b["mask"].all() for b in batches[:-1])


def test_eval_batches_errors():
  with pytest.raises(ValueError, match="at least 2"):
    list(batches_lib.eval_batches([b"a"], 4, 1))
  with pytest.raises(ValueError, match="seq_len"):
    batches_lib.eval_batches([b"abc"], 0, 1)
