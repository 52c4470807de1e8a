"""Trains a `TransformerLM` on an experiment config: byte-level LM or MQAR, resumable exactly.

Usage:
  python -m experiments.train --config lm_dca --workdir runs/lm_dca [--tiny] [--set steps=100]
  python -m experiments.train --workdir runs/lm_dca --resume   # the config comes from run.json
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m experiments.train --config lm_dca --tiny --workdir runs/sp --mesh data=2,seq=4
  ... --mesh data=4,seq=2 --fsdp     # parameters and optimiser state sharded over "data"

`--mesh data=D,seq=S` trains on D x S devices (`jax.sharding.Mesh`, `jax.shard_map`): batch
rows sharded over "data", positions over "seq" (every attention layer takes T sharded, see the
layers' `sequence_axis`), parameters and optimiser state replicated (with `--fsdp` sharded over
"data" between steps, FSDP-style: each device keeps 1/D of them and the step gathers the
parameters where the model reads them), the loss and gradients summed over the devices. The
default puts every device on "data". A run resumes onto another mesh, with or without `--fsdp`;
the same seed gives the same run on any mesh up to float reassociation.

What a run writes in its workdir:
  run.json       the config, the corpus (name, sizes, sha256), the machine, the date, the code's
                 git commit, the parameter count, and one entry per resume;
  metrics.jsonl  one JSON record every `log_every` steps (step, loss averaged over the interval,
                 lr, grad_norm, tokens_per_s, elapsed_s, time) and at every validation (val_loss,
                 val_bpb for "lm", val_accuracy for "mqar");
  checkpoints/   orbax checkpoints of {params, opt_state, step} every `checkpoint_every` steps, at
                 the end, when `max_steps` stops the run and on SIGINT / SIGTERM.

Resuming is exact: the batch of step s is a function of (seed, s) only (`experiments.tasks`),
the optimiser state holds the schedule's position, and the compiled step is the same, so
training N steps in one go or in pieces gives bitwise the same parameters.

This module is the loop and its command line; the model, optimiser and steps are
`experiments.model`, the data `experiments.tasks`, and what a workdir holds (and the stop on a
signal) `experiments.checkpoints`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from dca_jax.nn import count_params
from experiments import checkpoints as checkpoints_lib
from experiments import configs as configs_lib
from experiments import model as model_lib
from experiments import tasks as tasks_lib
from experiments.bookkeeping import git_commit, machine_info, now
from experiments.configs import ExperimentConfig


class _Progress:
  """A one-line progress bar on stdout (carriage return on a terminal, lines otherwise)."""

  def __init__(self, total: int, enabled: bool):
    self.total, self.enabled = total, enabled
    self.tty = enabled and sys.stdout.isatty()

  def update(self, step: int, text: str) -> None:
    if not self.enabled:
      return
    width = 24
    filled = int(width * step / max(self.total, 1))
    line = f"[{'#' * filled}{'.' * (width - filled)}] {step}/{self.total} {text}"
    if self.tty:
      sys.stdout.write("\r" + line.ljust(100))
    else:
      sys.stdout.write(line + "\n")
    sys.stdout.flush()

  def message(self, text: str) -> None:
    if self.enabled:
      sys.stdout.write(("\n" if self.tty else "") + text + "\n")
      sys.stdout.flush()


# Fields that may change when a run is resumed: they do not change what step s computes
# (`steps` changes the schedule, so resuming with another `steps` is no longer equivalent).
_RESUMABLE_CHANGES = frozenset({"steps", "log_every", "eval_every", "eval_batches",
                                "eval_batch_size", "checkpoint_every", "stop_accuracy"})


# --- the loop -------------------------------------------------------------------------------


def train(config: ExperimentConfig | None, workdir: str | os.PathLike[str], *,
          resume: bool = False, max_steps: int | None = None,
          progress: bool = True, mesh: Any = None, fsdp: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (see the module docstring for what is written there).

  Args:
    config: the experiment; None with `resume` takes it from the workdir's run.json.
    workdir: the run's directory (created).
    resume: continue from the latest checkpoint of `workdir`.
    max_steps: stop (with a checkpoint) once this many steps are done, as if interrupted there;
      the schedule still runs over `config.steps`. None: run to `config.steps`.
    progress: print a progress bar on stdout.
    mesh: None (one device) or a `jax.sharding.Mesh` with axes ("data", "seq")
      (`model.parse_mesh`): batch rows sharded over "data", positions over "seq", parameters
      and optimiser state replicated. The same seed gives the same run on any mesh up to float
      reassociation, and a run resumes onto another mesh (checkpoints hold whole arrays).
    fsdp: with a mesh, keep the parameters and optimiser state sharded over "data"
      (`model.place_train_state`) instead of replicated.

  Returns:
    A summary: "step" (steps done), "steps" (config.steps), "loss" (the last step's loss),
    "interrupted" (stopped by a signal), "stopped_early" (`config.stop_accuracy` was reached),
    "validation" (the last validation's metrics, or None),
    "elapsed_s" and "checkpoint_step".

  Raises:
    ValueError: `workdir` already holds checkpoints and `resume` is false, `resume` without a
      checkpoint, or a resumed config that differs from the run's in a field other than
      bookkeeping (steps, log_every, eval_every, eval_batches, eval_batch_size,
      checkpoint_every, stop_accuracy).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  manager = checkpoints_lib.checkpoint_manager(workdir)
  latest = manager.latest_step()
  if resume:
    if latest is None or not (workdir / "run.json").exists():
      raise ValueError(f"--resume: no checkpoint to resume from in {workdir}.")
    run = checkpoints_lib.read_run(workdir)
    stored = ExperimentConfig.from_dict(run["config"])
    config = stored if config is None else config
    changed = sorted(k for k, v in config.to_dict().items() if stored.to_dict()[k] != v)
    if set(changed) - _RESUMABLE_CHANGES:
      raise ValueError(f"cannot resume {workdir} with a different config: fields "
                       f"{sorted(set(changed) - _RESUMABLE_CHANGES)} differ from run.json.")
  else:
    if config is None:
      raise ValueError("config is required unless resuming.")
    if latest is not None:
      raise ValueError(f"{workdir} already holds checkpoints (step {latest}); pass --resume "
                       f"or use a fresh workdir.")
    changed = []

  task = tasks_lib.make_task(config)
  model_lib.check_batch_fits(mesh, config.batch_size, config.seq_len)
  model_lib.check_batch_fits(mesh, config.eval_batch_size, config.seq_len)
  _, tx, train_step, eval_step = model_lib.compiled_steps(config, mesh, fsdp)
  mesh_shape = None if mesh is None else dict(mesh.shape)
  schedule = model_lib.learning_rate_schedule(config)
  model = model_lib.build_model(config)
  num_params = count_params(model)
  # From here on only `params` and `opt_state` hold the weights: the train step donates them, so
  # each step's are the ones it returned (the model's own arrays are gone after the first step).
  _, params, rest = nnx.split(model, nnx.Param, ...)
  del model
  opt_state = tx.init(params)
  start = 0
  if resume:
    params, opt_state, start = checkpoints_lib.restore_train_state(manager, latest, params,
                                                                   opt_state)
    run.setdefault("resumes", []).append({"date": now(), "step": start, "changed": changed,
                                          "config": config.to_dict(), "mesh": mesh_shape,
                                          "fsdp": fsdp})
  else:
    run = {"config": config.to_dict(), "corpus": task.info(), "machine": machine_info(),
           "date": now(), "git_commit": git_commit(), "num_params": num_params,
           "argv": sys.argv, "mesh": mesh_shape, "fsdp": fsdp}
  if mesh is not None:
    # On the mesh's devices (a restored checkpoint comes back on one device).
    params, opt_state, rest = model_lib.place_train_state(params, opt_state, rest, mesh, fsdp)
  checkpoints_lib.write_run(workdir, run)
  metrics = checkpoints_lib.MetricsLog(workdir, start if resume else None)

  end = config.steps if max_steps is None else min(config.steps, max_steps)
  bar = _Progress(config.steps, progress)
  tokens_per_step = config.batch_size * config.seq_len
  t_start = time.perf_counter()
  interval_losses: list[jax.Array] = []
  interval_start, interval_steps = time.perf_counter(), 0
  last_loss, last_norm, validation = math.nan, math.nan, None
  stopped_early = False
  step = start

  def validate(step: int) -> dict[str, float]:
    result = model_lib.evaluate_batches(eval_step, params, rest, task.validation_batches())
    record = {"step": step, "val_loss": result["loss"], "val_accuracy": result["accuracy"],
              "val_targets": result["targets"], "elapsed_s": time.perf_counter() - t_start,
              "time": now()}
    if config.task == "lm":
      record["val_bpb"] = result["bpb"]
    metrics.write(record)
    summary = (f"val_bpb {result['bpb']:.4f}" if config.task == "lm"
               else f"val_acc {result['accuracy']:.4f}")
    bar.message(f"step {step}: val_loss {result['loss']:.4f} {summary}")
    return record

  with checkpoints_lib.StopFlag() as stop:
    while step < end and stop.signal is None:
      batch = task.train_batch(step)
      params, opt_state, loss, grad_norm = train_step(params, rest, opt_state, batch)
      step += 1
      interval_losses.append(loss)
      interval_steps += 1
      if step % config.log_every == 0 or step == end:
        losses = np.asarray(jax.device_get(interval_losses), dtype=np.float64)
        last_loss, last_norm = float(losses[-1]), float(grad_norm)
        elapsed = time.perf_counter() - interval_start
        tokens_per_s = interval_steps * tokens_per_step / max(elapsed, 1e-9)
        metrics.write({"step": step, "loss": float(losses.mean()), "last_loss": last_loss,
                       "lr": float(schedule(step - 1)), "grad_norm": last_norm,
                       "tokens_per_s": tokens_per_s, "steps_per_s": interval_steps / elapsed,
                       "elapsed_s": time.perf_counter() - t_start, "time": now()})
        bar.update(step, f"loss {losses.mean():.4f} | {tokens_per_s:,.0f} tok/s")
        interval_losses, interval_steps = [], 0
      if (config.eval_every and step % config.eval_every == 0) or step == config.steps:
        validation = validate(step)
        if (config.stop_accuracy is not None
            and validation["val_accuracy"] >= config.stop_accuracy):
          bar.message(f"step {step}: val_accuracy {validation['val_accuracy']:.4f} >= "
                      f"stop_accuracy {config.stop_accuracy}: stopping early.")
          stopped_early = True
          break
      if step % config.checkpoint_every == 0:
        checkpoints_lib.save_train_state(manager, step, params, opt_state)
      if interval_steps == 0:
        interval_start = time.perf_counter()
    if interval_losses:
      last_loss = float(interval_losses[-1])
    checkpoints_lib.save_train_state(manager, step, params, opt_state)
  manager.close()
  interrupted = stop.signal is not None
  if interrupted:
    bar.message(f"stopped by signal {stop.signal} at step {step}; checkpoint saved, continue "
                f"with --resume.")
  elif progress and bar.tty:
    sys.stdout.write("\n")
  return {"step": step, "steps": config.steps, "loss": last_loss, "interrupted": interrupted,
          "stopped_early": stopped_early, "validation": validation,
          "elapsed_s": time.perf_counter() - t_start,
          "checkpoint_step": step}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help=f"experiment name, one of {configs_lib.available()} "
                      "(optional with --resume: taken from run.json)")
  parser.add_argument("--workdir", required=True, help="run directory")
  parser.add_argument("--tiny", action="store_true", help="the CI-sized variant of the config")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (repeatable), e.g. --set steps=100")
  parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  parser.add_argument("--max-steps", type=int, default=None,
                      help="stop (with a checkpoint) after this many steps in total")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  parser.add_argument("--mesh", default=None, metavar="data=D,seq=S",
                      help="devices: D batch shards x S sequence shards (default: every device "
                           "on data)")
  parser.add_argument("--fsdp", action="store_true",
                      help="with --mesh: parameters and optimiser state sharded over data")
  args = parser.parse_args(argv)
  try:
    mesh = model_lib.parse_mesh(args.mesh)
  except ValueError as error:
    parser.error(str(error))
  overrides = dict(configs_lib.parse_override(s) for s in args.set)
  if args.config is not None:
    config = configs_lib.load_config(args.config, tiny=args.tiny, overrides=overrides)
  elif args.resume:
    config = configs_lib.apply_overrides(
        ExperimentConfig.from_dict(checkpoints_lib.read_run(args.workdir)["config"]), overrides)
  else:
    parser.error("--config is required unless --resume is given.")
  summary = train(config, args.workdir, resume=args.resume, max_steps=args.max_steps,
                  progress=not args.no_progress, mesh=mesh, fsdp=args.fsdp)
  print(json.dumps({k: v for k, v in summary.items()}, default=str))
  return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
  sys.exit(main())
