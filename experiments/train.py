"""Trains a `TransformerLM` on an experiment config: byte-level LM or MQAR, resumable exactly.

Usage:
  python -m experiments.train --config lm_dca --workdir runs/lm_dca [--tiny] [--set steps=100]
  python -m experiments.train --workdir runs/lm_dca --resume   # the config comes from run.json

What a run writes in its workdir:
  run.json       the config, the corpus (name, sizes, sha256), the machine, the date, the code's
                 git commit, the parameter count, and one entry per resume;
  metrics.jsonl  one JSON record every `log_every` steps (step, loss averaged over the interval,
                 lr, grad_norm, tokens_per_s, elapsed_s, time) and at every validation (val_loss,
                 val_bpb for "lm", val_accuracy for "mqar");
  checkpoints/   orbax checkpoints of {params, opt_state, step} every `checkpoint_every` steps, at
                 the end, when `max_steps` stops the run and on SIGINT / SIGTERM.

Resuming is exact: the batch of step s is a function of (seed, s) only (`PackedBatches.batch(s)`
for "lm", `np.random.default_rng([seed, 0, s])` for "mqar"), the optimiser state holds the
schedule's position, and the compiled step is the same, so training N steps in one go or in
pieces gives bitwise the same parameters.

The optimiser is AdamW (weight decay on matrices only) behind a global-norm gradient clip, with
a linear warm-up to `peak_lr` and a cosine decay to `peak_lr * min_lr_ratio` at `steps`
(`optax.warmup_cosine_decay_schedule`). The loss is the cross-entropy averaged over the
positions where `mask` is true.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import pathlib
import platform
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from dca_jax.nn.transformer import TransformerLM, count_params
from experiments import configs as configs_lib
from experiments import data as data_lib
from experiments import mqar as mqar_lib
from experiments.configs import ExperimentConfig

# Offsets of the MQAR generators' seeds: [seed, stream, index], so training and validation
# batches never share a generator.
_MQAR_TRAIN, _MQAR_VALID, _MQAR_TEST = 0, 1, 2


# --- model, optimiser, loss -----------------------------------------------------------------


def build_model(config: ExperimentConfig) -> TransformerLM:
  """The model of `config`, initialised from `config.seed`."""
  return TransformerLM(config.model_config(), rngs=nnx.Rngs(config.seed))


def learning_rate_schedule(config: ExperimentConfig) -> optax.Schedule:
  """Linear warm-up to peak_lr over warmup_steps, cosine decay to peak_lr * min_lr_ratio at steps."""
  warmup = min(config.warmup_steps, config.steps - 1) if config.steps > 1 else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.peak_lr, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1), end_value=config.peak_lr * config.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """True for the matrices (ndim >= 2) that weight decay applies to; the learned decay rates of
  DCA, norms and biases are not pulled towards zero."""
  def rule(path, leaf):
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return leaf.ndim >= 2 and not names & {"decay", "decay_bias"}
  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(config: ExperimentConfig) -> optax.GradientTransformation:
  """Global-norm clip then AdamW with `learning_rate_schedule` (see the module docstring)."""
  adamw = optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.95, eps=1e-8,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  if config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw


def masked_cross_entropy(logits: jax.Array, targets: jax.Array,
                         mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sums of the cross-entropy (nats), of the mask and of the correct argmax where mask is true.

  Args:
    logits: [B, T, V] float.
    targets: [B, T] int; entries where mask is false may be anything (e.g. -100).
    mask: [B, T] bool.

  Returns:
    (sum of -log p(target), number of counted positions, number of counted positions whose
    argmax is the target), float32 scalars.
  """
  mask = mask.astype(jnp.float32)
  safe = jnp.where(mask > 0, targets, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct * mask)


def _forward(graphdef, params, rest, batch):
  model = nnx.merge(graphdef, params, rest)
  return model(batch["tokens"], reset=batch.get("reset"))


def make_train_step(graphdef, tx: optax.GradientTransformation) -> Callable:
  """A jitted (params, rest, opt_state, batch) -> (params, opt_state, loss, grad_norm).

  `rest` is the model's non-parameter state (`nnx.split(model, nnx.Param, ...)`).
  """
  def loss_fn(params, rest, batch):
    total, count, _ = masked_cross_entropy(_forward(graphdef, params, rest, batch),
                                           batch["targets"], batch["mask"])
    return total / jnp.maximum(count, 1.0)

  @jax.jit
  def train_step(params, rest, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

  return train_step


def make_eval_step(graphdef) -> Callable:
  """A jitted (params, rest, batch) -> (sum nll, count, correct) (see `masked_cross_entropy`)."""
  @jax.jit
  def eval_step(params, rest, batch):
    return masked_cross_entropy(_forward(graphdef, params, rest, batch), batch["targets"],
                                batch["mask"])
  return eval_step


@functools.lru_cache(maxsize=8)
def compiled_steps(config: ExperimentConfig) -> tuple[Any, optax.GradientTransformation,
                                                      Callable, Callable]:
  """(graphdef, optimiser, train_step, eval_step) of a config, cached per config so that runs
  of one config in one process (a resume, the tests) share their compilations."""
  graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config)))[0]
  tx = make_optimizer(config)
  return graphdef, tx, make_train_step(graphdef, tx), make_eval_step(graphdef)


def evaluate_batches(eval_step: Callable, params: Any, rest: Any,
                     batches: Iterator[dict[str, np.ndarray]]) -> dict[str, float]:
  """Loss (nats per target), bits per target and argmax accuracy over `batches`."""
  total = count = correct = 0.0
  for batch in batches:
    t, c, k = eval_step(params, rest, batch)
    total, count, correct = total + float(t), count + float(c), correct + float(k)
  if count == 0:
    return {"loss": math.nan, "bpb": math.nan, "accuracy": math.nan, "targets": 0}
  loss = total / count
  return {"loss": loss, "bpb": loss / math.log(2.0), "accuracy": correct / count,
          "targets": int(count)}


# --- data -----------------------------------------------------------------------------------


def load_experiment_corpus(config: ExperimentConfig) -> data_lib.Corpus:
  """The corpus of an "lm" config: `load_corpus(corpus_path)` or the default corpus."""
  if config.corpus_path is None:
    return data_lib.build_default_corpus()
  return data_lib.load_corpus(config.corpus_path)


def mqar_batch(config: ExperimentConfig, stream: int, index: int, *,
               seq_len: int | None = None, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """MQAR batch `index` of a stream (train / valid / test), a function of (seed, stream, index)."""
  rng = np.random.default_rng([config.seed, stream, index])
  return mqar_lib.mqar_batch(rng, batch_size=batch_size or config.batch_size,
                             seq_len=seq_len or config.seq_len, num_pairs=config.mqar_pairs,
                             vocab_size=config.vocab_size)


class _Data:
  """Training batches by step and the validation batches of a config."""

  def __init__(self, config: ExperimentConfig):
    self.config = config
    self.corpus = None
    if config.task == "lm":
      self.corpus = load_experiment_corpus(config)
      self.packed = data_lib.PackedBatches(self.corpus.splits["train"], seq_len=config.seq_len,
                                           batch_size=config.batch_size, seed=config.seed)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    if self.config.task == "lm":
      return self.packed.batch(step)
    return mqar_batch(self.config, _MQAR_TRAIN, step)

  def validation_batches(self) -> Iterator[dict[str, np.ndarray]]:
    config = self.config
    limit = config.eval_batches or None
    batch_size = config.eval_batch_size or config.batch_size
    if config.task == "lm":
      batches = data_lib.eval_batches(self.corpus.splits["validation"], config.seq_len, batch_size)
      return (b for i, b in zip(range(limit or sys.maxsize), batches))
    return (mqar_batch(config, _MQAR_VALID, i, batch_size=batch_size)
            for i in range(limit or 16))

  def corpus_info(self) -> dict[str, Any] | None:
    if self.corpus is None:
      return None
    return {"name": self.corpus.name, "path": self.config.corpus_path, **dict(self.corpus.info)}


# --- checkpoints ----------------------------------------------------------------------------


def checkpoint_manager(workdir: str | os.PathLike[str]) -> ocp.CheckpointManager:
  """The orbax manager of `workdir/checkpoints` (synchronous saves, the last 3 kept)."""
  path = pathlib.Path(workdir).absolute() / "checkpoints"
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      max_to_keep=3, enable_async_checkpointing=False))


def _abstract_train_state(config: ExperimentConfig):
  """graphdef, rest, optimiser and the shape/dtype tree of {params, opt_state, step}."""
  abstract_model = nnx.eval_shape(lambda: build_model(config))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  tx = make_optimizer(config)
  abstract = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
  return graphdef, rest, tx, abstract


def read_run(workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """The run.json of a workdir."""
  path = pathlib.Path(workdir) / "run.json"
  if not path.exists():
    raise FileNotFoundError(f"no run.json in {workdir}: not a training workdir.")
  return json.loads(path.read_text())


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
  graphdef, rest, _, abstract = _abstract_train_state(config)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  manager.close()
  # Non-parameter state (none in TransformerLM today) is rebuilt from the seed.
  _, _, rest = nnx.split(build_model(config), nnx.Param, ...)
  return config, nnx.merge(graphdef, restored["params"], rest), int(restored["step"])


# --- bookkeeping ----------------------------------------------------------------------------


def _git_commit() -> str | None:
  root = pathlib.Path(__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("-dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
  """Host, Python, library versions and JAX devices."""
  import flax  # pylint: disable=g-import-not-at-top
  return {
      "hostname": platform.node(), "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "optax": optax.__version__, "numpy": np.__version__,
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
  }


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _Metrics:
  """Appends JSON records to metrics.jsonl, flushed at once."""

  def __init__(self, path: pathlib.Path, resume_step: int | None):
    self.path = path
    if resume_step is None:
      path.write_text("")
    elif path.exists():
      # Records written after the checkpoint we resume from describe steps that will be redone.
      kept = [line for line in path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      path.write_text("".join(line + "\n" for line in kept))

  def write(self, record: dict[str, Any]) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The records of a run's metrics.jsonl, in order (training and validation records)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


class _StopFlag:
  """Turns SIGINT / SIGTERM into a request to stop after the current step (a second SIGINT
  interrupts at once)."""

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


# Fields that may change when a run is resumed: they do not change what step s computes
# (`steps` changes the schedule, so resuming with another `steps` is no longer equivalent).
_RESUMABLE_CHANGES = frozenset({"steps", "log_every", "eval_every", "eval_batches",
                                "eval_batch_size", "checkpoint_every", "stop_accuracy"})


# --- the loop -------------------------------------------------------------------------------


def train(config: ExperimentConfig | None, workdir: str | os.PathLike[str], *,
          resume: bool = False, max_steps: int | None = None,
          progress: bool = True) -> dict[str, Any]:
  """Trains `config` in `workdir` (see the module docstring for what is written there).

  Args:
    config: the experiment; None with `resume` takes it from the workdir's run.json.
    workdir: the run's directory (created).
    resume: continue from the latest checkpoint of `workdir`.
    max_steps: stop (with a checkpoint) once this many steps are done, as if interrupted there;
      the schedule still runs over `config.steps`. None: run to `config.steps`.
    progress: print a progress bar on stdout.

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
  run_path = workdir / "run.json"
  manager = checkpoint_manager(workdir)
  latest = manager.latest_step()
  if resume:
    if latest is None or not run_path.exists():
      raise ValueError(f"--resume: no checkpoint to resume from in {workdir}.")
    run = json.loads(run_path.read_text())
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

  data = _Data(config)
  graphdef, tx, train_step, eval_step = compiled_steps(config)
  schedule = learning_rate_schedule(config)
  model = build_model(config)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)
  start = 0
  if resume:
    abstract = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}
    restored = manager.restore(latest, args=ocp.args.StandardRestore(
        jax.eval_shape(lambda: abstract)))
    params, opt_state, start = restored["params"], restored["opt_state"], int(restored["step"])
    run.setdefault("resumes", []).append({"date": _now(), "step": start, "changed": changed,
                                          "config": config.to_dict()})
  else:
    run = {"config": config.to_dict(), "corpus": data.corpus_info(), "machine": machine_info(),
           "date": _now(), "git_commit": _git_commit(), "num_params": count_params(model),
           "argv": sys.argv}
  run_path.write_text(json.dumps(run, indent=2) + "\n")
  metrics = _Metrics(workdir / "metrics.jsonl", start if resume else None)

  end = config.steps if max_steps is None else min(config.steps, max_steps)
  bar = _Progress(config.steps, progress)
  tokens_per_step = config.batch_size * config.seq_len
  t_start = time.perf_counter()
  interval_losses: list[jax.Array] = []
  interval_start, interval_steps = time.perf_counter(), 0
  last_loss, last_norm, validation = math.nan, math.nan, None
  stopped_early = False
  step = start

  def save(step: int) -> None:
    if manager.latest_step() != step:
      manager.save(step, args=ocp.args.StandardSave(
          {"params": params, "opt_state": opt_state, "step": jnp.asarray(step, jnp.int32)}))
      manager.wait_until_finished()

  def validate(step: int) -> dict[str, float]:
    result = evaluate_batches(eval_step, params, rest, data.validation_batches())
    record = {"step": step, "val_loss": result["loss"], "val_accuracy": result["accuracy"],
              "val_targets": result["targets"], "elapsed_s": time.perf_counter() - t_start,
              "time": _now()}
    if config.task == "lm":
      record["val_bpb"] = result["bpb"]
    metrics.write(record)
    summary = (f"val_bpb {result['bpb']:.4f}" if config.task == "lm"
               else f"val_acc {result['accuracy']:.4f}")
    bar.message(f"step {step}: val_loss {result['loss']:.4f} {summary}")
    return record

  with _StopFlag() as stop:
    while step < end and stop.signal is None:
      batch = data.train_batch(step)
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
                       "elapsed_s": time.perf_counter() - t_start, "time": _now()})
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
        save(step)
      if interval_steps == 0:
        interval_start = time.perf_counter()
    if interval_losses:
      last_loss = float(interval_losses[-1])
    save(step)
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
  args = parser.parse_args(argv)
  overrides = dict(configs_lib.parse_override(s) for s in args.set)
  if args.config is not None:
    config = configs_lib.load_config(args.config, tiny=args.tiny, overrides=overrides)
  elif args.resume:
    config = configs_lib.apply_overrides(
        ExperimentConfig.from_dict(read_run(args.workdir)["config"]), overrides)
  else:
    parser.error("--config is required unless --resume is given.")
  summary = train(config, args.workdir, resume=args.resume, max_steps=args.max_steps,
                  progress=not args.no_progress)
  print(json.dumps({k: v for k, v in summary.items()}, default=str))
  return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
  sys.exit(main())
