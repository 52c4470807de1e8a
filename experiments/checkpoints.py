"""What a training run keeps in its workdir, and how it is stopped.

  run.json       the config, the data's record, the machine, the date, the code's git commit,
                 the parameter count, and one entry per resume (`read_run`, `write_run`);
  metrics.jsonl  one JSON record per line (`MetricsLog` appends, `read_metrics` reads);
  checkpoints/   orbax checkpoints of {params, opt_state, step} (`checkpoint_manager`,
                 `save_train_state`, `restore_train_state`, `load_checkpoint`).

`StopFlag` turns SIGINT / SIGTERM into a request to stop after the current step, so that the loop
can write a checkpoint before it exits.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from dca_jax.nn import TransformerLM
from experiments import model as model_lib
from experiments.configs import ExperimentConfig


def checkpoint_manager(workdir: str | os.PathLike[str]) -> ocp.CheckpointManager:
  """The orbax manager of `workdir/checkpoints` (synchronous saves, the last 3 kept)."""
  path = pathlib.Path(workdir).absolute() / "checkpoints"
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=3, enable_async_checkpointing=False))


def latest_step(workdir: str | os.PathLike[str]) -> int | None:
  """The step of the latest checkpoint in `workdir`, or None (nothing to resume from)."""
  manager = checkpoint_manager(workdir)
  step = manager.latest_step()
  manager.close()
  return step


def save_train_state(manager: ocp.CheckpointManager, step: int, params: Any,
                     opt_state: Any) -> None:
  """Saves {params, opt_state, step} as checkpoint `step`, unless it is the latest already."""
  if manager.latest_step() != step:
    manager.save(step, args=ocp.args.StandardSave(
        {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}))
    manager.wait_until_finished()


def restore_train_state(manager: ocp.CheckpointManager, step: int, params: Any,
                        opt_state: Any) -> tuple[Any, Any, int]:
  """(params, opt_state, step) of checkpoint `step`; `params` and `opt_state` give the structure
  (arrays, whose shardings the restored arrays take, or `jax.ShapeDtypeStruct`s)."""
  def shape(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  abstract = jax.tree.map(shape, {"params": params, "opt_state": opt_state,
                                  "step": jax.ShapeDtypeStruct((), jnp.int32)})
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return restored["params"], restored["opt_state"], int(restored["step"])


def read_run(workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """The run.json of a workdir.

  Raises:
    FileNotFoundError: no run.json in `workdir`.
  """
  path = pathlib.Path(workdir) / "run.json"
  if not path.exists():
    raise FileNotFoundError(f"no run.json in {workdir}: not a training workdir.")
  return json.loads(path.read_text())


def write_run(workdir: str | os.PathLike[str], run: dict[str, Any]) -> None:
  """Writes the run.json of a workdir."""
  (pathlib.Path(workdir) / "run.json").write_text(json.dumps(run, indent=2) + "\n")


def load_checkpoint(workdir: str | os.PathLike[str], step: int | None = None
                    ) -> tuple[ExperimentConfig, TransformerLM, int]:
  """The config of a run and its model restored from a checkpoint (the latest by default).

  Returns:
    (config, model, step).

  Raises:
    FileNotFoundError: no run.json or no checkpoint in `workdir`.
  """
  config = ExperimentConfig.from_dict(read_run(workdir)["config"])
  manager = checkpoint_manager(workdir)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}.")
  graphdef, params, _ = nnx.split(nnx.eval_shape(lambda: model_lib.build_model(config)),
                                  nnx.Param, ...)
  opt_state = jax.eval_shape(model_lib.make_optimizer(config).init, params)
  params, _, step = restore_train_state(manager, step, params, opt_state)
  manager.close()
  # Non-parameter state (none in TransformerLM today) is rebuilt from the seed.
  _, _, rest = nnx.split(model_lib.build_model(config), nnx.Param, ...)
  return config, nnx.merge(graphdef, params, rest), step


class MetricsLog:
  """Appends JSON records to a run's metrics.jsonl, flushed at once.

  Args:
    workdir: the run's directory.
    resume_step: None starts an empty file; a step keeps the records up to it (those written
      after the checkpoint a run resumes from describe steps that will be redone).
  """

  def __init__(self, workdir: str | os.PathLike[str], resume_step: int | None):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    if resume_step is None:
      self.path.write_text("")
    elif self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, record: dict[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a run's metrics.jsonl, in order (training and validation records)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StopFlag:
  """Turns SIGINT / SIGTERM into a request to stop after the current step (a second SIGINT
  interrupts at once). A context manager; `signal` is the signal received, or None."""

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False
