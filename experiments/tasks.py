"""The tasks a run trains on, behind one protocol: byte-level language modelling and MQAR.

A `Task` gives the training batch of a step (a function of the config's seed and the step only,
so a resumed run sees exactly the batches it would have seen), evaluation batches of a split at
any context length, the validation batches of a run, and what to record about its data:

* `LMTask`: the corpus of the config (`corpus_path`, or the default standard-library corpus);
  training batches are `PackedBatches(...).batch(step)`, evaluation batches cover the split once
  (`eval_batches`), all of it unless limited.
* `MQARTask`: fresh MQAR sequences (`experiments.mqar`) from `np.random.default_rng([seed,
  stream, index])`, with one stream per split, so that training, validation and test sequences
  never share a generator; 16 batches per evaluation unless limited.

Every batch is a dict of NumPy arrays: "tokens", "targets" int32 [B, T], "mask" bool [B, T] and,
for "lm", "reset" bool [B, T].
"""

from __future__ import annotations

import abc
import itertools
from typing import Any, Iterator

import numpy as np

from experiments import batches as batches_lib
from experiments import corpus as corpus_lib
from experiments import mqar as mqar_lib
from experiments.configs import ExperimentConfig


class Task(abc.ABC):
  """The data of a run: training batches by step, evaluation batches by split, a record."""

  def __init__(self, config: ExperimentConfig):
    self.config = config

  @abc.abstractmethod
  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """The training batch of `step` (0-based), [config.batch_size, config.seq_len]."""

  @abc.abstractmethod
  def eval_batches(self, split: str, seq_len: int, batch_size: int,
                   limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Batches [batch_size, seq_len] of `split` ("validation" or "test"), at most `limit`."""

  def validation_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """The batches of a validation during training (`eval_batches`, `eval_batch_size`)."""
    config = self.config
    return self.eval_batches("validation", config.seq_len,
                             config.eval_batch_size or config.batch_size,
                             config.eval_batches or None)

  def info(self) -> dict[str, Any] | None:
    """What run.json records about the data (None: nothing beyond the config)."""
    return None


class LMTask(Task):
  """Byte-level language modelling on the config's corpus."""

  def __init__(self, config: ExperimentConfig):
    super().__init__(config)
    if config.corpus_path is None:
      self.corpus = corpus_lib.build_default_corpus()
    else:
      self.corpus = corpus_lib.load_corpus(config.corpus_path)
    self.packed = batches_lib.PackedBatches(self.corpus.splits["train"], seq_len=config.seq_len,
                                            batch_size=config.batch_size, seed=config.seed)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self.packed.batch(step)

  def eval_batches(self, split: str, seq_len: int, batch_size: int,
                   limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The split covered once in rows of `seq_len` (`batches.eval_batches`); all of it when
    `limit` is None."""
    batches = batches_lib.eval_batches(self.corpus.splits[split], seq_len, batch_size)
    return batches if limit is None else itertools.islice(batches, limit)

  def info(self) -> dict[str, Any]:
    return {"name": self.corpus.name, "path": self.config.corpus_path, **dict(self.corpus.info)}


class MQARTask(Task):
  """Multi-query associative recall on fresh sequences."""

  # The generators' streams, [seed, stream, index].
  STREAMS = {"train": 0, "validation": 1, "test": 2}
  # Sequences are endless: an evaluation without a limit takes this many batches.
  DEFAULT_BATCHES = 16

  def batch(self, split: str, index: int, *, seq_len: int | None = None,
            batch_size: int | None = None) -> dict[str, np.ndarray]:
    """Batch `index` of a split's stream, a function of (seed, stream, index) only."""
    config = self.config
    rng = np.random.default_rng([config.seed, self.STREAMS[split], index])
    return mqar_lib.mqar_batch(rng, batch_size=batch_size or config.batch_size,
                               seq_len=seq_len or config.seq_len, num_pairs=config.mqar_pairs,
                               vocab_size=config.vocab_size)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self.batch("train", step)

  def eval_batches(self, split: str, seq_len: int, batch_size: int,
                   limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    return (self.batch(split, i, seq_len=seq_len, batch_size=batch_size)
            for i in range(limit or self.DEFAULT_BATCHES))


def make_task(config: ExperimentConfig) -> Task:
  """The task of `config` ("lm" or "mqar")."""
  return LMTask(config) if config.task == "lm" else MQARTask(config)
