"""Smoke tests of experiments/train.py and evaluate.py on the tiny variant of every experiment.

The runs go through the real code path (corpus or MQAR data, jitted step, orbax checkpoints,
metrics file); one run per config is shared by the tests through a module fixture, and runs of one
config in one process share their compilation (`model.compiled_steps`).
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import oracles
import train_checks
from experiments import checkpoints as checkpoints_lib
from experiments import configs
from experiments import evaluate as evaluate_lib
from experiments import model as model_lib
from experiments import train as train_lib

# CI trains one MQAR config here; the tiny suite's lm_dca run (tests/test_suite.py) is checked
# by the same `train_checks`, and the demo and the tiny suite train the other kinds. The full job
# (DCA_TESTS=full) trains all four here.
EXPERIMENTS = (("lm_dca", "lm_softmax", "mqar_dca", "mqar_softmax") if oracles.FULL
               else ("mqar_softmax",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Each tiny config trained to its end (4 steps) in its own workdir: name -> (workdir, summary)."""
  out = {}
  for name in EXPERIMENTS:
    workdir = tmp_path_factory.mktemp(name)
    summary = train_lib.train(configs.load_config(name, tiny=True), workdir, progress=False)
    out[name] = (workdir, summary)
  return out


def test_tiny_runs_train_and_evaluate(runs, tmp_path):
  """The checks of the shared runs are one test: under pytest-xdist each worker that runs a test
  of the `runs` fixture builds it (~10 s a config on the 2-core CPU; xdist's loadgroup does not
  group tests under pytest 9.2 and xdist 3.8), so they stay together on one worker."""
  for name in EXPERIMENTS:
    train_checks.check_config_trained(*runs[name], name)
  if "lm_dca" in runs:   # in CI, tests/test_suite.py checks the tiny suite's lm_dca run instead
    train_checks.check_lm_dca_run(*runs["lm_dca"], tmp_path / "lm_dca")
  _check_fresh_run_refuses_a_used_workdir(runs)
  _check_evaluate_mqar_accuracy(runs)


def _check_fresh_run_refuses_a_used_workdir(runs):
  workdir, _ = runs["mqar_softmax"]
  with pytest.raises(ValueError, match="--resume"):
    train_lib.train(configs.load_config("mqar_softmax", tiny=True), workdir, progress=False)


def test_unknown_override_key_raises():
  with pytest.raises(ValueError, match="'stepz'"):
    configs.load_config("lm_dca", tiny=True, overrides={"stepz": 3})
  with pytest.raises(ValueError, match="'no_such_key'"):
    train_lib.main(["--config", "lm_dca", "--tiny", "--workdir", "unused",
                    "--set", "no_such_key=1"])
  with pytest.raises(ValueError, match="unknown experiment"):
    configs.load_config("lm_nothing")


def test_stop_accuracy_ends_the_run_at_the_first_good_validation(tmp_path, monkeypatch):
  # The validation's accuracies are scripted: the run must stop at the first one >= 0.99 (step
  # 2 of 4), with its checkpoint, and say so.
  accuracies = iter([0.5, 0.995, 1.0, 1.0])

  def scripted(*args, **kwargs):
    del args, kwargs
    return {"loss": 1.0, "accuracy": next(accuracies), "targets": 8, "bpb": math.nan}

  monkeypatch.setattr(model_lib, "evaluate_batches", scripted)
  config = configs.load_config("mqar_softmax", tiny=True,
                               overrides={"eval_every": 1, "stop_accuracy": 0.99})
  summary = train_lib.train(config, tmp_path, progress=False)
  assert summary["stopped_early"] and not summary["interrupted"]
  assert summary["step"] == summary["checkpoint_step"] == 2
  assert [r["step"] for r in train_checks.records(tmp_path) if "val_accuracy" in r] == [1, 2]
  assert checkpoints_lib.load_checkpoint(tmp_path)[2] == 2
  for bad in (0.0, 1.5, True):
    with pytest.raises(ValueError, match=f"stop_accuracy must be None or in \\(0, 1\\], got {bad!r}"):
      configs.load_config("mqar_softmax", tiny=True, overrides={"stop_accuracy": bad})


def test_override_parsing():
  assert configs.parse_override("peak_lr=1e-3") == ("peak_lr", 1e-3)
  assert configs.parse_override("grad_clip=None") == ("grad_clip", None)
  config = configs.load_config("lm_dca", tiny=True, overrides=dict(
      [configs.parse_override("steps=7"), configs.parse_override("attention_options.window=4")]))
  assert config.steps == 7 and config.attention_options.window == 4
  for name in configs.available():
    configs.load_config(name).model_config()  # full-size configs are valid models


def _check_evaluate_mqar_accuracy(runs):
  workdir, _ = runs["mqar_softmax"]
  out = evaluate_lib.evaluate(workdir, [32], max_batches=1, write=False)
  accuracy = out["contexts"]["32"]["accuracy"]
  assert 0 <= accuracy <= 1 and out["sample"] is None


def test_masked_cross_entropy_ignores_masked_targets():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
  targets = np.array([[1, -100, 4], [0, 2, -100]])
  mask = targets >= 0
  total, count, _ = model_lib.masked_cross_entropy(logits, targets, mask)
  logp = jax.nn.log_softmax(logits)
  expected = -sum(float(logp[b, t, targets[b, t]]) for b, t in zip(*np.nonzero(mask)))
  assert float(count) == 4 and float(total) == pytest.approx(expected, rel=1e-5)


def test_config_docstring_examples():
  import doctest  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(configs, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
