"""Checks of a finished tiny training run, shared by tests/test_train.py and tests/test_suite.py.

The tiny suite (test_suite) already trains `lm_dca`'s tiny config through the suite's code path;
its workdir is checked here as test_train checks its own runs, so CI trains that config once.
"""

from __future__ import annotations

import json
import math

import chex
import pytest

from experiments import checkpoints as checkpoints_lib
from experiments import configs
from experiments import evaluate as evaluate_lib
from experiments import train as train_lib


def records(workdir):
  return checkpoints_lib.read_metrics(workdir)


def check_config_trained(workdir, summary, name):
  """The run of config `name` (tiny) in `workdir` went to its end with every record and
  checkpoint; `summary` is what `train.train` returned (step, interrupted, loss)."""
  config = configs.load_config(name, tiny=True)
  assert summary["step"] == config.steps and not summary["interrupted"]
  assert math.isfinite(summary["loss"])
  metrics = records(workdir)
  train_records = [r for r in metrics if "loss" in r]
  assert [r["step"] for r in train_records] == list(range(1, config.steps + 1))
  assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_records)
  key = "val_bpb" if config.task == "lm" else "val_accuracy"
  val = [r for r in metrics if key in r]
  assert [r["step"] for r in val] == [2, 4] and all(math.isfinite(r[key]) for r in val)
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  run = json.loads((workdir / "run.json").read_text())
  assert run["config"] == config.to_dict() and "machine" in run and "date" in run
  if config.task == "lm":
    assert len(run["corpus"]["sha256"]) == 64 and run["corpus"]["bytes"]["train"] > 0


def check_lm_dca_run(workdir, summary, tmp_path):
  """A finished tiny `lm_dca` run: resuming a half run equals it, and evaluate reads it."""
  check_config_trained(workdir, summary, "lm_dca")
  tmp_path.mkdir()
  _check_resume_equals_uninterrupted_run(workdir, summary, tmp_path)
  _check_evaluate_on_tiny_checkpoint(workdir)
  _check_evaluate_samples_text(workdir)


def _check_resume_equals_uninterrupted_run(straight_dir, straight, tmp_path):
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
  last = lambda d: [r for r in records(d) if "loss" in r][-1]
  assert last(tmp_path)["last_loss"] == pytest.approx(straight["loss"], abs=1e-6)
  assert [r["step"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3, 4]
  assert len(json.loads((tmp_path / "run.json").read_text())["resumes"]) == 1


def _check_evaluate_on_tiny_checkpoint(workdir):
  # Context 32 at 4 rows is the training shape (its compilation is reused); 16 is a new one.
  out = evaluate_lib.evaluate(workdir, [32, 16], max_batches=2)
  assert out["step"] == 4
  assert set(out["contexts"]) == {"32", "16"}
  for result in out["contexts"].values():
    assert math.isfinite(result["bpb"]) and 0 < result["bpb"] < 16 and result["targets"] > 0
  assert out["sample"] is None
  assert json.loads((workdir / "eval.json").read_text())["step"] == 4


def _check_evaluate_samples_text(workdir):
  out = evaluate_lib.evaluate(workdir, [32], max_batches=1, sample=4, write=False)
  assert math.isfinite(out["contexts"]["32"]["bpb"])
  assert isinstance(out["sample"]["text"], str) and out["sample"]["prompt"]
