"""Evaluates a trained run: test-split bits per byte (or MQAR accuracy) at several contexts.

Usage:
  python -m experiments.evaluate --workdir runs/lm_dca --contexts 128,512,2048 [--sample 200]
  python -m experiments.evaluate --workdir runs/mqar_dca --contexts 256,512

Loads the latest checkpoint of the workdir (its config from run.json) and, for each context
length T:
  "lm":   the test split cut into rows of T bytes by `eval_batches` (every byte after the first
          predicted once; a new row starts from an empty context), bits per byte = summed
          cross-entropy / (ln 2 * number of predicted bytes). The full forward is used for every
          attention type (no decode cache). Rows per batch default to about the training
          batch's tokens: max(1, batch_size * seq_len // T).
  "mqar": answer accuracy on fresh MQAR sequences of length T with the run's number of pairs
          (a length-generalisation check beyond the training length).
With `--sample N`, also samples N bytes with `dca_jax.nn.generate` from a prompt (the
start of the test split, or `--prompt`). Writes `workdir/eval.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dca_jax.nn import generate
from experiments import checkpoints as checkpoints_lib
from experiments import model as model_lib
from experiments import tasks as tasks_lib
from experiments.bookkeeping import now


def evaluate(workdir: str | os.PathLike[str], contexts: Sequence[int], *,
             sample: int = 0, prompt: str | None = None, max_batches: int | None = None,
             batch_size: int | None = None, split: str = "test", temperature: float = 0.8,
             top_k: int | None = None, seed: int = 0, write: bool = True) -> dict[str, Any]:
  """Evaluates the latest checkpoint of `workdir` at each context length.

  Args:
    workdir: a training workdir (run.json and checkpoints/).
    contexts: context lengths T to evaluate at.
    sample: bytes to sample after the prompt (0: none; "lm" runs only).
    prompt: the sampling prompt (default: the first 64 bytes of the split).
    max_batches: evaluate at most this many batches per context (None: the whole split; for
      "mqar", 16 batches).
    batch_size: rows per batch (default: about the training batch's tokens, see the module
      docstring).
    split: "test" or "validation" ("lm").
    temperature, top_k: sampling parameters.
    seed: the sampling key.
    write: write `workdir/eval.json`.

  Returns:
    {"step", "config", "split", "contexts": {T: {"loss", "bpb", "accuracy", "targets",
    "batches", "seconds"}}, "sample": {"prompt", "text"} or None, "date"}.

  Raises:
    FileNotFoundError: no run.json or checkpoint in workdir.
    ValueError: a context length < 1, or a bad split.
  """
  contexts = [int(t) for t in contexts]
  if not contexts or min(contexts) < 1:
    raise ValueError(f"contexts must be integers >= 1, got {contexts}.")
  if split not in ("test", "validation"):
    raise ValueError(f"split must be 'test' or 'validation', got {split!r}.")
  config, model, step = checkpoints_lib.load_checkpoint(workdir)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  eval_step = model_lib.compiled_steps(config)[3]
  task = tasks_lib.make_task(config)
  # MQAR is scored on its test sequences whatever `split` says (the split is the corpus's).
  task_split = split if config.task == "lm" else "test"
  results: dict[int, dict[str, Any]] = {}
  for t in contexts:
    rows = batch_size or max(1, config.batch_size * config.seq_len // t)
    start = time.perf_counter()
    counted = _Counted(task.eval_batches(task_split, t, rows, max_batches))
    result = model_lib.evaluate_batches(eval_step, params, rest, counted)
    result.update(batches=counted.count, batch_size=rows, seconds=time.perf_counter() - start)
    results[t] = result
  sampled = None
  if sample and config.task == "lm":
    sampled = _sample(model, task.corpus.splits[split], sample, prompt, temperature, top_k, seed)
  out = {"workdir": str(workdir), "step": step, "config": config.to_dict(), "split": split,
         "contexts": {str(t): r for t, r in results.items()}, "sample": sampled,
         "date": now()}
  if write:
    pathlib.Path(workdir, "eval.json").write_text(json.dumps(out, indent=2) + "\n")
  return out


class _Counted:
  """Iterates and counts."""

  def __init__(self, iterable):
    self.iterable, self.count = iterable, 0

  def __iter__(self):
    for item in self.iterable:
      self.count += 1
      yield item


def _sample(model, documents, length: int, prompt: str | None, temperature: float,
            top_k: int | None, seed: int) -> dict[str, str]:
  if prompt is None:
    prompt_bytes = b"".join(documents)[:64] or b"\n"
  else:
    prompt_bytes = prompt.encode("utf-8") or b"\n"
  tokens = jnp.asarray(np.frombuffer(prompt_bytes, dtype=np.uint8).astype(np.int32))[None]
  out = generate(model, tokens, max_new_tokens=length, rng=jax.random.key(seed),
                 temperature=temperature, top_k=top_k)
  text = bytes(np.asarray(out[0]).astype(np.uint8)).decode("utf-8", errors="replace")
  return {"prompt": prompt_bytes.decode("utf-8", errors="replace"), "text": text}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--contexts", default="128,512,2048",
                      help="comma-separated context lengths")
  parser.add_argument("--sample", type=int, default=0, help="bytes to sample (lm)")
  parser.add_argument("--prompt", default=None)
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--top-k", type=int, default=None)
  parser.add_argument("--max-batches", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=None)
  parser.add_argument("--split", default="test", choices=("test", "validation"))
  args = parser.parse_args(argv)
  contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
  out = evaluate(args.workdir, contexts, sample=args.sample, prompt=args.prompt,
                 max_batches=args.max_batches, batch_size=args.batch_size, split=args.split,
                 temperature=args.temperature, top_k=args.top_k)
  metric = "bpb" if out["config"]["task"] == "lm" else "accuracy"
  for t, r in out["contexts"].items():
    print(f"T={t:>6}: {metric} {r[metric]:.4f} (loss {r['loss']:.4f}, {r['targets']} targets, "
          f"{r['seconds']:.1f} s)")
  if out["sample"]:
    print("--- sample ---\n" + out["sample"]["prompt"] + out["sample"]["text"])
  print(f"wrote {pathlib.Path(args.workdir) / 'eval.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
