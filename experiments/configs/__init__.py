"""Experiment configurations: one module per experiment, each with `get_config(tiny=False)`.

Every experiment is an `ExperimentConfig`, a frozen dataclass holding the model (the fields of
`TransformerConfig` that matter here), the task and its data, the optimiser and the schedule of
evaluations and checkpoints. `load_config(name, tiny, overrides)` imports
`experiments.configs.<name>` and applies overrides; unknown keys are errors. On the command line
an override is `--set key=value` (see `parse_override`); `attention_options.<option>=value` sets
one option of the attention layer. `tiny_variant` is the CI-sized variant every config has.

Example:
  >>> config = load_config("lm_dca", tiny=True, overrides={"steps": 3})
  >>> config.steps, config.task, config.model_config().attention
  (3, 'lm', 'dca')
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
from typing import Any, Literal, Mapping

from dca_jax.nn import LayerOptions, TransformerConfig, layer_spec

TASKS = ("lm", "mqar")
# Prefix of override keys that set one option of the attention layer.
_OPTION_PREFIX = "attention_options."


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a training run depends on; validated on construction.

  Attributes:
    name: the experiment's name (its config module).
    task: "lm" (byte-level language modelling on a corpus) or "mqar" (multi-query associative
      recall, `experiments/mqar.py`).
    d_model, num_layers, num_heads, attention, attention_options, vocab_size: the model, see
      `TransformerConfig`; attention_options is given as a mapping, (name, value) pairs or the
      layer's options dataclass and stored as that dataclass (`dca_jax.nn.layer_spec`).
    seq_len: T, tokens per training row.
    batch_size: B, rows per step.
    steps: optimiser steps of the run (the schedule's length).
    peak_lr: the learning rate after warm-up.
    warmup_steps: linear warm-up from 0 to peak_lr.
    min_lr_ratio: the cosine decay ends at peak_lr * min_lr_ratio at `steps`.
    weight_decay: AdamW's decoupled weight decay, on matrices only (not norms, biases or decays).
    grad_clip: global gradient norm clip (0 or None: none).
    seed: the seed of the parameters and of the data (batch s is a function of (seed, s)).
    log_every: steps between metric records (and progress updates).
    eval_every: steps between validations (0: only at the end).
    eval_batches: batches per validation (0: the whole validation split).
    eval_batch_size: rows per validation batch (0: batch_size).
    checkpoint_every: steps between checkpoints (one is also written at the end and on interrupt).
    mqar_pairs: P, key-value pairs per MQAR sequence (task "mqar").
    stop_accuracy: stop the run early, with a checkpoint, at the first validation whose answer
      accuracy is at least this (for MQAR: a budget study needs the steps to learn, not more);
      None: always run `steps`. The learning-rate schedule still spans `steps`.
    corpus_path: a text file or directory for `load_corpus`; None: `build_default_corpus()`.
  """

  name: str
  task: Literal["lm", "mqar"] = "lm"
  # Model.
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  attention: str = "dca"
  attention_options: Any = None
  vocab_size: int = 256
  # Data.
  seq_len: int = 256
  batch_size: int = 16
  # Optimisation.
  steps: int = 1000
  peak_lr: float = 3e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  grad_clip: float | None = 1.0
  seed: int = 0
  # Bookkeeping.
  log_every: int = 10
  eval_every: int = 250
  eval_batches: int = 16
  eval_batch_size: int = 0
  checkpoint_every: int = 250
  # Task data.
  mqar_pairs: int = 16
  stop_accuracy: float | None = None
  corpus_path: str | None = None

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"task must be one of {TASKS}, got {self.task!r}.")
    # The registry names the layer (ValueError) and checks its option names (TypeError).
    object.__setattr__(self, "attention_options",
                       layer_spec(self.attention).parse_options(self.attention_options))
    for name in ("d_model", "num_layers", "num_heads", "vocab_size", "seq_len", "batch_size",
                 "steps", "log_every", "checkpoint_every", "mqar_pairs"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    for name in ("warmup_steps", "eval_every", "eval_batches", "eval_batch_size", "seed"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    if not self.peak_lr > 0:
      raise ValueError(f"peak_lr must be > 0, got {self.peak_lr!r}.")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}.")
    if not self.weight_decay >= 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
    if self.grad_clip is not None and not self.grad_clip >= 0:
      raise ValueError(f"grad_clip must be >= 0 or None, got {self.grad_clip!r}.")
    if self.stop_accuracy is not None and not (
        isinstance(self.stop_accuracy, (int, float)) and not isinstance(self.stop_accuracy, bool)
        and 0 < self.stop_accuracy <= 1):
      raise ValueError(f"stop_accuracy must be None or in (0, 1], got {self.stop_accuracy!r}.")
    if self.task == "mqar" and self.seq_len < 4 * self.mqar_pairs:
      raise ValueError(f"seq_len must be >= 4 * mqar_pairs = {4 * self.mqar_pairs} for MQAR, "
                       f"got {self.seq_len}.")

  def model_config(self) -> TransformerConfig:
    """The `TransformerConfig` of the model (validated, so bad model fields raise here)."""
    return TransformerConfig(vocab_size=self.vocab_size, d_model=self.d_model,
                             num_layers=self.num_layers, num_heads=self.num_heads,
                             attention=self.attention, attention_options=self.attention_options)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-friendly dict (attention_options: the options that differ from the layer's
    defaults); `from_dict` inverts it."""
    d = dataclasses.asdict(self)
    d["attention_options"] = self.attention_options.changed()
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ExperimentConfig:
    """The config from `to_dict`'s output; unknown keys raise ValueError."""
    return apply_overrides(cls(name=d["name"]), {k: v for k, v in d.items() if k != "name"})


def available() -> list[str]:
  """Names of the experiment config modules."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def apply_overrides(config: ExperimentConfig, overrides: Mapping[str, Any] | None) -> ExperimentConfig:
  """`config` with fields replaced; "attention_options.<option>" sets one layer option.

  Raises:
    ValueError: naming the key, for a key that is not a field of `ExperimentConfig`, or a value
      that the config rejects.
  """
  if not overrides:
    return config
  fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
  changes: dict[str, Any] = {}
  option_changes: dict[str, Any] = {}
  for key, value in overrides.items():
    if key.startswith(_OPTION_PREFIX) and len(key) > len(_OPTION_PREFIX):
      option_changes[key[len(_OPTION_PREFIX):]] = value
    elif key in fields:
      changes[key] = value
    else:
      raise ValueError(f"unknown config key {key!r}; known keys: {sorted(fields)} and "
                       f"'{_OPTION_PREFIX}<option>'.")
  # A whole attention_options value replaces the options; single options apply on top. They
  # travel as the non-default names, so that a change of `attention` keeps what still applies.
  options = changes.get("attention_options", config.attention_options)
  if isinstance(options, LayerOptions):
    options = options.changed()
  options = dict(options.items() if isinstance(options, Mapping) else (options or ()))
  changes["attention_options"] = {**options, **option_changes}
  return dataclasses.replace(config, **changes)


# The sizes of the attention options in the CI-sized variants, at most.
_TINY_OPTIONS = {"window": 8, "feature_dim": 8}


def tiny_attention_options(attention: str, options: Any) -> LayerOptions:
  """`options` of layer `attention` shrunk to a CI-sized model: window and feature_dim <= 8."""
  options = layer_spec(attention).parse_options(options)
  return dataclasses.replace(options, **{
      name: min(getattr(options, name), limit) for name, limit in _TINY_OPTIONS.items()
      if hasattr(options, name)})


def tiny_variant(config: ExperimentConfig, **changes: Any) -> ExperimentConfig:
  """The CI-sized variant of `config` (seconds on a CPU, same code paths), `changes` on top.

  One layer of width 32 with 2 heads and small attention options (`tiny_attention_options`),
  4 steps of 4 rows of 32 tokens, a metric record every step, validations (2 batches) and
  checkpoints every 2 steps; `changes` replace any of these.
  """
  fields = dict(
      d_model=32, num_layers=1, num_heads=2,
      attention_options=tiny_attention_options(config.attention, config.attention_options),
      seq_len=32, batch_size=4, steps=4, peak_lr=3e-3, warmup_steps=1, log_every=1,
      eval_every=2, eval_batches=2, checkpoint_every=2)
  return dataclasses.replace(config, **{**fields, **changes})


def load_config(name: str, tiny: bool = False,
                overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
  """The config of experiment `name` (module `experiments.configs.<name>`), with overrides.

  Args:
    name: an experiment, one of `available()`.
    tiny: the CI-sized variant.
    overrides: field name -> value (see `apply_overrides`).

  Returns:
    The `ExperimentConfig`.

  Raises:
    ValueError: an unknown experiment or override key (naming it), or a bad value.
  """
  if name not in available():
    raise ValueError(f"unknown experiment {name!r}; available: {available()}.")
  module = importlib.import_module(f"{__name__}.{name}")
  return apply_overrides(module.get_config(tiny=tiny), overrides)


def parse_value(text: str) -> Any:
  """A command-line value: int, float, bool (true/false), None (none/null), or else a string.

  Python literals (tuples, dicts, quoted strings) are parsed too.

  Example:
    >>> [parse_value(s) for s in ("3", "1e-3", "true", "None", "dca", "{'window': 8}")]
    [3, 0.001, True, None, 'dca', {'window': 8}]
  """
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, SyntaxError):
    return text


def parse_override(text: str) -> tuple[str, Any]:
  """Splits a `--set key=value` argument into (key, parsed value).

  Raises:
    ValueError: no "=" or an empty key.

  Example:
    >>> parse_override("steps=100"), parse_override("attention_options.window=32")
    (('steps', 100), ('attention_options.window', 32))
  """
  key, sep, value = text.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"an override must look like key=value, got {text!r}.")
  return key.strip(), parse_value(value)
