"""Runs the experiment suite behind docs/benchmark_results.md: ablations, the LM comparison, MQAR.

Usage:
  python -m experiments.suite run --suite ablations --runs runs/suite [--workers 2]
  python -m experiments.suite run --suite lm --runs runs/suite
  python -m experiments.suite run --suite mqar --runs runs/suite
  python -m experiments.suite run --suite mqar_long --runs runs/suite   # the budget study
  python -m experiments.suite run --suite delta --runs runs/suite   # opt-in: Gated DeltaNet, DCA memory="delta"
  python -m experiments.suite run --suite recall --runs runs/recall  # opt-in: issue #12's MQAR study
  python -m experiments.suite run --suite seeds --runs runs/corpus  # opt-in: second seeds, corpus
  python -m experiments.suite run --suite long --runs runs/corpus   # opt-in: the same pair at T = 1024
  python -m experiments.suite run --suite budget --runs runs/corpus # opt-in: T = 256, 3x the steps
  python -m experiments.suite speed --out runs/suite/speed.json   # tokens/s, side by side
  python -m experiments.suite render --runs runs/suite            # docs/benchmark_results.*
  python -m experiments.suite render-corpus --runs runs/corpus    # docs/corpus_comparison.*
  python -m experiments.suite list --suite all                    # what would run
Add `--tiny` to `run` for the CI-sized variants (seconds per run, same code paths).

The runs are the plan's (`experiments/suite_plan.py`). `run` trains each one
(`experiments.train.train`) in its own subprocess, in `runs/<name>/`, then evaluates it
(`experiments.evaluate.evaluate`: bits per byte on the test split at 1/4x, 1x, 4x and 16x the
training length for "lm", answer accuracy on fresh test sequences for "mqar") and writes
`runs/<name>/result.json`. A run whose result.json exists is skipped and an interrupted one
resumes from its checkpoint, so the command can be re-run until everything is done. With
`--workers 2` two runs train at once: more runs per hour on two cores, but their wall-clock
speeds are not comparable, which is why speeds come from `speed` (`experiments/suite_speed.py`:
all attention types timed round-robin in one process, after warm-up, median of several
repeats). `render` is `experiments/suite_report.py`.

The budgets are set by what fits the 2-core CPU of this project's machines, not by what the
tasks need to converge: see docs/benchmark_results.md for the budget of every table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import pathlib
import subprocess
import sys
import time
from typing import Any, Sequence

from flax import nnx

from dca_jax.nn import TransformerLM, count_params
from experiments import bookkeeping
from experiments import checkpoints as checkpoints_lib
from experiments import evaluate as evaluate_lib
from experiments import recall_study
from experiments import suite_plan
from experiments import suite_report
from experiments import suite_speed
from experiments import train as train_lib
from experiments.suite_plan import Run


def run_one(run: Run, runs_root: pathlib.Path, *, tiny: bool = False) -> dict[str, Any]:
  """Trains (or resumes) and evaluates one run; writes and returns its result.json."""
  workdir = runs_root / run.name
  config = suite_plan.run_config(run, tiny=tiny)
  resume = checkpoints_lib.latest_step(workdir) is not None
  start = time.perf_counter()
  summary = train_lib.train(config, workdir, resume=resume, progress=False)
  if summary["interrupted"]:
    raise KeyboardInterrupt(f"{run.name} interrupted at step {summary['step']}")
  train_s = time.perf_counter() - start
  if config.task == "lm":
    contexts = sorted({max(8, int(config.seq_len * f)) for f in suite_plan.LM_CONTEXT_FACTORS})
    # Long contexts: fewer rows per batch and a cap on the batches keep the evaluation's cost
    # about the same at every length (the same test bytes are scored at every length).
    evaluation = evaluate_lib.evaluate(workdir, contexts, max_batches=1 if tiny else 16,
                                       write=True)
  else:
    evaluation = evaluate_lib.evaluate(workdir, [config.seq_len],
                                       max_batches=2 if tiny else 16, batch_size=64, write=True)
  model = nnx.eval_shape(lambda: TransformerLM(config.model_config(), rngs=nnx.Rngs(0)))
  metrics = checkpoints_lib.read_metrics(workdir)
  train_records = [m for m in metrics if "loss" in m]
  result = {
      "name": run.name, "group": run.group, "label": run.label, "config": config.to_dict(),
      "num_params": count_params(model), "steps": summary["step"],
      "stopped_early": summary["stopped_early"],
      "tokens": summary["step"] * config.batch_size * config.seq_len,
      "final_train_loss": train_records[-1]["loss"] if train_records else None,
      "validation": summary["validation"], "train_wall_s": train_s,
      "evaluation": {t: {k: r[k] for k in ("loss", "bpb", "accuracy", "targets")}
                     for t, r in evaluation["contexts"].items()},
      "curve": [{k: m[k] for k in ("step", "val_loss", "val_accuracy", "val_bpb") if k in m}
                for m in metrics if "val_loss" in m],
      "machine": bookkeeping.machine_info(),
      "date": bookkeeping.now(),
      "tiny": tiny,
  }
  if run.group == "recall":
    result["distance_accuracy"] = recall_study.distance_accuracy(
        workdir, batches=2 if tiny else 16, batch_size=64)
  bookkeeping.write_json(workdir / "result.json", result)
  return result


def run_suite(runs: Sequence[Run], runs_root: pathlib.Path, *, workers: int = 1,
              tiny: bool = False, in_process: bool = False) -> list[str]:
  """Runs every run without a result.json; returns the names of the runs that failed."""
  runs_root.mkdir(parents=True, exist_ok=True)
  todo = [r for r in runs if not (runs_root / r.name / "result.json").exists()]
  print(f"{len(runs) - len(todo)} of {len(runs)} runs already done; {len(todo)} to run.",
        flush=True)
  failed: list[str] = []
  if in_process:
    for run in todo:
      run_one(run, runs_root, tiny=tiny)
    return failed

  def launch(run: Run) -> tuple[str, int, float]:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "experiments.suite", "one", "--name", run.name,
           "--runs", str(runs_root)] + (["--tiny"] if tiny else [])
    log_path = runs_root / f"{run.name}.log"
    with log_path.open("w") as log_file:
      code = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, check=False).returncode
    return run.name, code, time.perf_counter() - start

  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for name, code, seconds in pool.map(launch, todo):
      status = "ok" if code == 0 else f"FAILED (exit {code}, see {runs_root / name}.log)"
      print(f"{name}: {status} in {seconds:.0f} s", flush=True)
      if code:
        failed.append(name)
  return failed
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p_run = sub.add_parser("run", help="train and evaluate the runs of a suite")
  p_run.add_argument("--suite", default="all")
  p_run.add_argument("--runs", default="runs/suite")
  p_run.add_argument("--workers", type=int, default=1)
  p_run.add_argument("--only", default=None, help="comma-separated run names")
  p_run.add_argument("--tiny", action="store_true")
  p_one = sub.add_parser("one", help="one run (used by `run`)")
  p_one.add_argument("--name", required=True)
  p_one.add_argument("--runs", default="runs/suite")
  p_one.add_argument("--tiny", action="store_true")
  p_list = sub.add_parser("list", help="list the runs of a suite")
  p_list.add_argument("--suite", default="all")
  p_speed = sub.add_parser("speed", help="training and decoding tokens/s of every attention")
  p_speed.add_argument("--out", default="runs/suite/speed.json")
  p_speed.add_argument("--repeats", type=int, default=7)
  p_speed.add_argument("--tiny", action="store_true")
  p_render = sub.add_parser("render", help="docs/benchmark_results.{json,md} and plots")
  p_render.add_argument("--runs", default="runs/suite")
  p_render.add_argument("--out", default="docs")
  p_corpus = sub.add_parser("render-corpus",
                            help="docs/corpus_comparison.{json,md} from the corpus runs of --runs")
  p_corpus.add_argument("--runs", default="runs/corpus")
  p_corpus.add_argument("--out", default="docs")
  p_corpus.add_argument("--carry", default=None,
                        help="an earlier corpus_comparison.json: its runs that --runs lacks are "
                             "rendered too, marked as carried over")
  args = parser.parse_args(argv)

  if args.command == "list":
    for run in suite_plan.suite_runs(args.suite):
      print(f"{run.name:45s} {run.config:12s} {run.override_dict()}")
    return 0
  if args.command == "one":
    run_one(suite_plan.find_run(args.name), pathlib.Path(args.runs), tiny=args.tiny)
    return 0
  if args.command == "run":
    runs = suite_plan.suite_runs(args.suite)
    if args.only:
      wanted = set(args.only.split(","))
      unknown = wanted - {r.name for r in runs}
      if unknown:
        parser.error(f"--only: unknown runs {sorted(unknown)}")
      runs = [r for r in runs if r.name in wanted]
    failed = run_suite(runs, pathlib.Path(args.runs), workers=args.workers, tiny=args.tiny)
    return 1 if failed else 0
  if args.command == "speed":
    suite_speed.measure_speed(pathlib.Path(args.out), repeats=args.repeats, tiny=args.tiny)
    return 0
  if args.command == "render-corpus":
    suite_report.render_corpus(pathlib.Path(args.runs), pathlib.Path(args.out),
                               carry=None if args.carry is None else pathlib.Path(args.carry))
    return 0
  if args.command == "render":
    suite_report.render(pathlib.Path(args.runs), pathlib.Path(args.out))
    return 0
  return 2


if __name__ == "__main__":
  sys.exit(main())
