"""Smoke tests of experiments/train.py and evaluate.py on the tiny variant of every experiment.

The runs go through the real code path (corpus or MQAR data, jitted step, orbax checkpoints,
metrics file); one run per config is shared by the tests through a module fixture, and runs of one
config in one process share their compilation (`model.compiled_steps`).
"""

from __future__ import annotations

import json
import math

import chex
import jax
import numpy as np
import pytest

import oracles
from experiments import checkpoints as checkpoints_lib
from experiments import configs
from experiments import evaluate as evaluate_lib
from experiments import model as model_lib
from experiments import train as train_lib

# CI trains one LM and one MQAR config (the demo and the tiny suite train the others' kinds too);
# the full job (DCA_TESTS=full) all four.
EXPERIMENTS = (("lm_dca", "lm_softmax", "mqar_dca", "mqar_softmax") if oracles.FULL
               else ("lm_dca", "mqar_softmax"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Each tiny config trained to its end (4 steps) in its own workdir: name -> (workdir, summary)."""
  out = {}
  for name in EXPERIMENTS:
    workdir = tmp_path_factory.mktemp(name)
    summary = train_lib.train(configs.load_config(name, tiny=True), workdir, progress=False)
    out[name] = (workdir, summary)
  return out


def _records(workdir):
  return checkpoints_lib.read_metrics(workdir)


def test_tiny_runs_train_resume_and_evaluate(runs, tmp_path):
  """The checks of the shared runs are one test: under pytest-xdist each worker that runs a test
  of the `runs` fixture builds it (~40 s a config on the 2-core CPU; xdist's loadgroup does not
  group tests under pytest 9.2 and xdist 3.8), so they stay together on one worker."""
  for name in EXPERIMENTS:
    _check_config_trained(runs, name)
  (tmp_path / "resume").mkdir()
  _check_resume_equals_uninterrupted_run(runs, tmp_path / "resume")
  _check_fresh_run_refuses_a_used_workdir(runs)
  _check_evaluate_on_tiny_checkpoint(runs)
  _check_evaluate_samples_text(runs)
  _check_evaluate_mqar_accuracy(runs)


def _check_config_trained(runs, name):
  workdir, summary = runs[name]
  config = configs.load_config(name, tiny=True)
  assert summary["step"] == config.steps and not summary["interrupted"]
  assert math.isfinite(summary["loss"])
  records = _records(workdir)
  train_records = [r for r in records if "loss" in r]
  assert [r["step"] for r in train_records] == list(range(1, config.steps + 1))
  assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_records)
  key = "val_bpb" if config.task == "lm" else "val_accuracy"
  val = [r for r in records if key in r]
  assert [r["step"] for r in val] == [2, 4] and all(math.isfinite(r[key]) for r in val)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  run = json.loads((workdir / "run.json").read_text())
  assert run["config"] == config.to_dict() and "machine" in run and "date" in run
  if config.task == "lm":
    assert len(run["corpus"]["sha256"]) == 64 and run["corpus"]["bytes"]["train"] > 0


def _check_resume_equals_uninterrupted_run(runs, tmp_path):
  straight_dir, straight = runs["lm_dca"]
  config = configs.load_config("lm_dca", tiny=True)
  first = train_lib.train(config, tmp_path, max_steps=config.steps // 2, progress=False)
  assert first["step"] == config.steps // 2
  # The rest through the command line, config taken from run.json.
  assert train_lib.main(["--workdir", str(tmp_path), "--resume", "--no-progress"]) == 0
  _, model_a, step_a = checkpoints_lib.load_checkpoint(straight_dir)
  _, model_b, step_b = checkpoints_lib.load_checkpoint(tmp_path)
  assert step_a == step_b == config.steps
  from flax import nnx  # pylint: disable=g-import-not-at-top
  chex.assert_trees_all_close(nnx.state(model_a, nnx.Param), nnx.state(model_b, nnx.Param),
                              atol=1e-6, rtol=1e-6)
  last = lambda d: [r for r in _records(d) if "loss" in r][-1]
  assert last(tmp_path)["last_loss"] == pytest.approx(straight["loss"], abs=1e-6)
  assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 2, 3, 4]
  assert len(json.loads((tmp_path / "run.json").read_text())["resumes"]) == 1


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
  assert [r["step"] for r in _records(tmp_path) if "val_accuracy" in r] == [1, 2]
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


def _check_evaluate_on_tiny_checkpoint(runs):
  # Context 32 at 4 rows is the training shape (its compilation is reused); 16 is a new one.
  workdir, _ = runs["lm_dca"]
  out = evaluate_lib.evaluate(workdir, [32, 16], max_batches=2)
  assert out["step"] == 4
  assert set(out["contexts"]) == {"32", "16"}
  for result in out["contexts"].values():
    assert math.isfinite(result["bpb"]) and 0 < result["bpb"] < 16 and result["targets"] > 0
  assert out["sample"] is None
  assert json.loads((workdir / "eval.json").read_text())["step"] == 4


def _check_evaluate_samples_text(runs):
  workdir, _ = runs["lm_dca"]
  out = evaluate_lib.evaluate(workdir, [32], max_batches=1, sample=4, write=False)
  assert math.isfinite(out["contexts"]["32"]["bpb"])
  assert isinstance(out["sample"]["text"], str) and out["sample"]["prompt"]


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
